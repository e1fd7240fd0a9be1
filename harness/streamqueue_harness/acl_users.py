"""Redis ACL users exactly as ``python -m streamqueue.acl`` prints them, created on a real Redis with a
fresh password each: what an operator following docs/kubectl-sq.md and docs/worker.md would run."""

from __future__ import annotations

import secrets
import shlex
import subprocess
import sys
from typing import Any


def create_generated_users(admin: Any, *acl_args: str) -> dict[str, str]:
    """Run each ``ACL SETUSER`` line of ``python -m streamqueue.acl ACL_ARGS`` as ``admin`` (a redis-py
    client, a cluster client included), with ``>PASSWORD`` replaced; the password of each user printed."""
    printed = subprocess.run(
        [sys.executable, "-m", "streamqueue.acl", *acl_args], capture_output=True, text=True, check=True
    ).stdout
    passwords: dict[str, str] = {}
    for line in printed.splitlines():
        words = shlex.split(line)
        user = words[2]
        passwords[user] = secrets.token_hex(12)
        admin.execute_command(*(f">{passwords[user]}" if w == ">PASSWORD" else w for w in words))
    return passwords
