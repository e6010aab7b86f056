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


def _list(kind: str, registry: dict, json_output: bool, forms: bool) -> int:
    """Print each registered pass or backend: name, (IR forms), first doc line, options."""
    if json_output:
        print(json.dumps({name: {**({"forms": list(cls.forms())} if forms else {}), "doc": _first_line(cls),
                                 "options": cls.describe_options()} for name, cls in registry.items()},
                         indent=2, default=str))
        return 0
    if not registry:
        print(f"no {kind} registered")
    for name, cls in registry.items():
        where = f"  [{', '.join(cls.forms()).upper() or '-'}]" if forms else ""
        print(f"{name}{where}  {_first_line(cls)}")
        print("\n".join(_option_lines(cls.describe_options())))
    return 0


def _passes_run(args) -> int:
    from graphopt.pipeline.registry import available_passes

    return _list("passes", available_passes(), args.json, forms=True)


def _backends_run(args) -> int:
    from graphopt.pipeline.registry import available_backends

    return _list("backends", available_backends(), args.json, forms=False)


register_command("passes", _json_flag, _passes_run, "list passes: name, IR forms, options")
register_command("backends", _json_flag, _backends_run, "list backends and their options")
