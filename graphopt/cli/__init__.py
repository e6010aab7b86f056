"""The `graphopt` command line: one module per command in this package, each registering itself.

User errors (any GraphoptError, bad arguments) print one line on stderr and exit with code 2.
Progress goes to stderr; results (tables, JSON) go to stdout, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from graphopt.cli.command import COMMANDS
from graphopt.errors import GraphoptError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: argparse's usage dump is noise for a mistyped flag."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _load_commands() -> None:
    """Import every module of this package: each registers its commands."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "command":
            importlib.import_module(f"{__name__}.{module.name}")


def build_parser() -> argparse.ArgumentParser:
    import graphopt

    parser = _Parser(prog="graphopt", description="Compile models for phones and NPUs: passes, recipes, backends.")
    parser.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    _load_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            raise _UsageError(f"graphopt: error: choose a command: {', '.join(COMMANDS)} (see 'graphopt --help')")
        code = COMMANDS[args.command].run(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (_UsageError, GraphoptError, OSError) as exc:  # OSError: an unwritable or vanished path
        message = " ".join(str(exc).split("\n"))
        print(message if isinstance(exc, _UsageError) else f"graphopt: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
