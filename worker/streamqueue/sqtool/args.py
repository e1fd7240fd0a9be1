"""The dead-letter commands' arguments, declared once: ``python -m streamqueue.sqtool`` parses them,
and ``kubectl sq dlq`` declares the same ones and passes them on (``dlq_argv``)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..deadletters import Filter

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)")
    return float(match[1]) * _UNITS[match[2] or "s"]


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="only this dl_reason (e.g. max_deliveries_exceeded)")
    parser.add_argument("--user", help="only this user_id")
    parser.add_argument("--older-than", type=duration, metavar="AGE", help="dead-lettered at least AGE ago")
    parser.add_argument("--newer-than", type=duration, metavar="AGE", help="dead-lettered at most AGE ago")
    parser.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="only this entry id (repeatable)"
    )
    parser.add_argument("--limit", type=int, default=None, help="act on at most this many")


def add_dlq_commands(dlq: argparse.ArgumentParser, *parents: argparse.ArgumentParser) -> None:
    """``list``, ``show``, ``redrive`` and ``purge`` under ``dlq``; ``parents``' arguments come first
    (``kubectl sq`` adds the queue's name and its own options)."""
    commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="{list,show,redrive,purge}")
    listing = commands.add_parser(
        "list",
        parents=parents,
        help="dead letters, oldest first",
        description="List dead letters, oldest first.",
    )
    show = commands.add_parser(
        "show", parents=parents, help="one dead letter, every field", description="Show one dead letter."
    )
    show.add_argument("entry_id", metavar="ID")
    changes = [
        commands.add_parser(
            name,
            parents=parents,
            help=f"{what} the matching dead letters",
            description=f"{what.capitalize()} the matching dead letters (--all if no filter is given).",
        )
        for name, what in (("redrive", "put back into the queue"), ("purge", "delete"))
    ]
    for sub in (listing, *changes):
        add_filters(sub)
    for sub in changes:
        sub.add_argument("--dry-run", action="store_true", help="only list what would be done")
        sub.add_argument("--all", action="store_true", help="required when no filter is given")


def dead_letter_filter(args: argparse.Namespace) -> Filter:
    return Filter(args.reason, args.user, args.older_than, args.newer_than)


def has_filter(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name) is not None for name in ("reason", "user", "older_than", "newer_than", "ids")
    )


def dlq_argv(args: argparse.Namespace) -> list[str]:
    """The ``dlq ...`` arguments that parse back into ``args`` (to run the command elsewhere)."""
    argv = ["dlq", args.dlq_command]
    if args.dlq_command == "show":
        return [*argv, args.entry_id]
    options: dict[str, Any] = {
        "--reason": args.reason, "--user": args.user, "--older-than": args.older_than,
        "--newer-than": args.newer_than, "--limit": args.limit,
    }  # fmt: skip
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    argv += [part for entry_id in args.ids or [] for part in ("--id", entry_id)]
    argv += [flag for flag in ("--dry-run", "--all") if getattr(args, flag[2:].replace("-", "_"), False)]
    return argv


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m streamqueue.sqtool",
        description="The Redis side of kubectl sq; the queue comes from the STREAMQUEUE_* environment.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="backlog, consumers, leases, limit bound, dead letters")
    add_dlq_commands(commands.add_parser("dlq", help="dead letters"))
    return top
