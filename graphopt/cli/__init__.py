"""The `graphopt` command line: one module per command in this package, each registering itself.

User errors (any GraphoptError, bad arguments) print one line on stderr and exit with code 2; an
unexpected error prints one line and exits with 1 (`--debug` anywhere shows the traceback).
Progress goes to stderr; results (tables, JSON) go to stdout, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import pkgutil
import signal
import sys
import traceback

from graphopt.cli.command import COMMANDS
from graphopt.errors import GraphoptError

__all__ = ["main", "build_parser", "install_signal_handlers"]

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


def install_signal_handlers() -> None:
    """SIGTERM ends a run the way Ctrl-C does (KeyboardInterrupt): staged outputs are removed and
    nothing half-written is left behind."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 ok, 2 a user error (one line naming the file, option or
    node), 1 an unexpected error (one line; `--debug` shows the traceback), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        install_signal_handlers()
        _load_commands()
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            raise _UsageError(f"graphopt: error: choose a command: {', '.join(COMMANDS)} (see 'graphopt --help')")
        code = COMMANDS[args.command].run(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (_UsageError, GraphoptError) as exc:
        if debug:
            traceback.print_exc()
        print(exc if isinstance(exc, _UsageError) else f"graphopt: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graphopt passes | head`: the reader left; nothing to report
        _silence_stdout()
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        where = getattr(exc, "filename", None)
        print(f"graphopt: unexpected error: {type(exc).__name__}: {_one_line(exc)}"
              + (f" ({where})" if where else "")
              + ("" if debug else " (run again with --debug for the traceback; please report it)"), file=sys.stderr)
        return 1
    return int(code or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass


def _one_line(exc: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


if __name__ == "__main__":
    sys.exit(main())
