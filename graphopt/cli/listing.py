"""`graphopt passes` and `graphopt backends`: what can run, in which IR form, with which options."""

from __future__ import annotations

import argparse
import json

from graphopt.cli.command import register_command


def _option_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        default = "required" if row.get("required") or (row["default"] is None and "None" not in row["type"]) else repr(row["default"])
        lines.append(f"    {row['name']}: {row['type']} = {default}" + (f"  — {row['help']}" if row["help"] else ""))
    return lines or ["    (no options)"]


def _first_line(obj) -> str:
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _passes_run(args) -> int:
    from graphopt.pipeline.registry import available_passes

    passes = available_passes()
    if args.json:
        print(json.dumps({name: {"forms": list(cls.forms()), "doc": _first_line(cls),
                                 "options": cls.describe_options()} for name, cls in passes.items()}, indent=2, default=str))
        return 0
    if not passes:
        print("no passes registered")
        return 0
    for name, cls in passes.items():
        print(f"{name}  [{', '.join(cls.forms()).upper() or '-'}]  {_first_line(cls)}")
        print("\n".join(_option_lines(cls.describe_options())))
    return 0


def _backends_run(args) -> int:
    from graphopt.pipeline.registry import available_backends

    backends = available_backends()
    if args.json:
        print(json.dumps({name: {"doc": _first_line(cls), "options": cls.describe_options()}
                          for name, cls in backends.items()}, indent=2, default=str))
        return 0
    if not backends:
        print("no backends registered")
        return 0
    for name, cls in backends.items():
        print(f"{name}  {_first_line(cls)}")
        print("\n".join(_option_lines(cls.describe_options())))
    return 0


register_command("passes", _json_flag, _passes_run, "list passes: name, IR forms, options")
register_command("backends", _json_flag, _backends_run, "list backends and their options")
