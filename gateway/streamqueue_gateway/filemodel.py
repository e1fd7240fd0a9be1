"""The base of every section of the gateway's config file (``config``, ``auth``, ``quotas``): camelCase
in the YAML, snake_case in Python, an unknown field an error (a typo must not pass as a default), and
frozen, since the settings are read once at start."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class FileModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)
