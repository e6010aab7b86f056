"""How the command line ends: one line for every error, a traceback only with --debug."""

import pytest

from graphopt import cli
from graphopt.cli.command import COMMANDS, Command
from graphopt.errors import OptionError


def _command(monkeypatch, run):
    monkeypatch.setitem(COMMANDS, "test-fail", Command("test-fail", "fails", lambda parser: None, run))


def _boom(args):
    raise ZeroDivisionError("division by zero")


def test_an_unexpected_error_is_one_line_with_a_hint(monkeypatch, capsys):
    _command(monkeypatch, _boom)
    assert cli.main(["test-fail"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected error: ZeroDivisionError: division by zero" in err and "--debug" in err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    _command(monkeypatch, _boom)
    assert cli.main(["test-fail", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def bad(args):
        raise OptionError("option 'bits'\nmust be 4 or 8" + "x" * 5000)

    _command(monkeypatch, bad)
    assert cli.main(["test-fail"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphopt: error: option 'bits' must be 4 or 8") and len(err) < 2100


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt, 130), (BrokenPipeError, 0)])
def test_interrupts_and_closed_pipes(monkeypatch, capsys, exc, code):
    def stop(args):
        raise exc()

    _command(monkeypatch, stop)
    assert cli.main(["test-fail"]) == code


def test_an_interrupt_while_commands_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C during start-up (the commands' imports) once ended in a KeyboardInterrupt traceback."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_commands", interrupted)
    assert cli.main(["passes"]) == 130
    assert capsys.readouterr().err == "graphopt: interrupted\n"


def test_the_entry_point_imports_nothing_heavy_before_main_runs():
    """What runs before main's handlers (importing graphopt.cli) is kept small: an interrupt there is
    the only one that could still show a traceback, so torch, onnx and numpy load inside main."""
    import subprocess
    import sys

    code = ("import sys, graphopt.cli; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'yaml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
