"""``streamqueue-gateway``: serve the gateway (``--config``), or ``hash-key`` for the API keys file."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import CONFIG_ENV


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hash-key"]:
        from .auth import hash_key_main

        return hash_key_main(args[1:])
    parser = argparse.ArgumentParser(
        prog="streamqueue-gateway",
        description="OpenAI-compatible HTTP gateway in front of streamqueues. "
        "`streamqueue-gateway hash-key` prints the hash of an API key read from stdin.",
    )
    parser.add_argument("--config", type=Path, help=f"the YAML configuration (default: ${CONFIG_ENV})")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="port for the API, probes and /metrics")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parsed = parser.parse_args(args)
    logging.basicConfig(level=parsed.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import serve
    from .config import load_config

    try:
        config = load_config(parsed.config)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    serve(config, parsed.host, parsed.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
