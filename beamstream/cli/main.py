"""The ``beamstream`` command line: one entry point, a sub-command per job.

Errors meant for people (bad settings, unreachable cluster, unreadable image)
are printed on one line; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from beamstream.errors import BeamstreamError

#: Modules under beamstream.commands, each with ``register(subparsers)``.
COMMAND_MODULES = ("cluster", "topics", "config", "demo", "analyse", "worker", "watch", "simulate", "feedback",
                   "dlq", "archiver", "replay", "ispyb_sink", "ispyb_schema", "go",
                   "dashboard", "monitor", "spool", "bluesky_bridge")


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as a single line naming the bad argument (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = OneLineErrorParser(
        prog="beamstream",
        description="Beamstream: per-image analysis of synchrotron crystallography data on Kafka.",
        epilog="Settings come from BEAMSTREAM_* environment variables or beamstream.toml; "
        "see `beamstream config`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"beamstream.cli.commands.{name}")
        module.register(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [BeamstreamError]
    for module, name in (("beamstream.diffraction.errors", "DiffractionError"),
                         ("beamstream.schemas.serde", "SerdeError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.verbose:
        # librdkafka narrates every failed connection attempt (hundreds of lines while Kafka is
        # unreachable) and every retried condition: a command says what failed in one line of its
        # own. Long-running services set this logger up again for their JSON logs; -v shows it all.
        logging.getLogger("beamstream.librdkafka").setLevel(logging.CRITICAL + 1)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"beamstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `beamstream ... | head` closed the pipe: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
