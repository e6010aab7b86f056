"""Runs a suite: every table's rows built, measured and compared; the result in one JSON schema.

The result of a run (`run_suite`) is small by design: the rows (one flat list, each naming its
table), the protocol it ran with, the environment (versions, processor, device), the command and
the date. No per-window or per-layer dumps.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bench.build import Builder, Skipped, describe
from bench.context import Context
from bench.measures import MEASURES, State
from bench.spec import BENCH, Protocol, Suite, SuiteError, Table
from graphopt.evaluation.tables import environment
from graphopt.files.json_files import write_json

__all__ = ["SCHEMA", "RESULTS", "PEER_PACKAGES", "run_suite", "run_table", "write_result", "load_results", "row_index"]

SCHEMA = "graphopt-bench/1"
RESULTS = BENCH / "results"
PEER_PACKAGES = ("nncf", "onnxruntime-genai", "onnx-ir", "kvpress", "peft")
RESULT_KEYS = ("schema", "suite", "date", "command", "device", "protocol", "environment", "rows")


def run_suite(suite: Suite, protocol: Protocol, *, device: str = "cpu", only: list[str] | None = None,
              command: str = "", log: Callable[[str], None] = print) -> dict:
    """Measure every table of `suite` (or only the rows named in `only`, with the rows they are
    compared with) and return the result."""
    if suite.needs == "cuda" and device == "cpu":
        raise SuiteError(f"suite '{suite.name}' trains on a GPU: run it with --device cuda")
    ctx = Context(protocol, device=device, log=log)
    rows: list[dict] = []
    for table in suite.tables:
        rows += run_table(table, ctx, only)
    return {"schema": SCHEMA, "suite": suite.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "device": _device(device), "protocol": protocol.data,
            "environment": environment(peers=_peer_versions()), "rows": rows}


def run_table(table: Table, ctx: Context, only: list[str] | None = None) -> list[dict]:
    """The table's rows, measured in declared order (the reference row first)."""
    builder = Builder(ctx, table)
    state = State(reference=table.reference.name if table.reference else "",
                  compared={name for r in table.rows for name in r.against} | {r.name for r in table.rows if r.reference})
    wanted = _needed(table, only)
    values: dict[str, dict] = {}
    if table.measure == "decode":  # decoders are measured together: speed interleaves the rows
        from bench.decode import measure_decode_table

        values = measure_decode_table(table, ctx, [r for r in table.rows if r.name in wanted])
    for row in sorted(table.rows, key=lambda r: not r.reference):
        if row.name not in wanted or row.name in values:
            continue
        ctx.log(f"bench: {table.name}: {row.name} ...")
        try:
            built = builder.build(row)
        except Skipped as exc:
            values[row.name] = {"skipped": str(exc)}
            ctx.log(f"bench: {table.name}: {row.name} skipped: {exc}")
            continue
        measured = MEASURES[table.measure](table, row, built, ctx, state)
        built_from_float = [kind for kind, _ in row.build] != ["fp32"]
        measured.update({"build_s": built.seconds if built_from_float else None, **built.extra,
                         **_stats(table, built.stats)})
        values[row.name] = measured
        builder.release(row)
        gc.collect()
    _ratios(table, values)
    _quotients(table, values)
    return [{"table": table.name, "name": row.name, "build": describe(row),
             **({"recipe": row.recipe} if row.recipe else {}), **values[row.name]}
            for row in table.rows if row.name in values]


def _needed(table: Table, only: list[str] | None) -> set[str]:
    """`only` (all rows when None) with the reference and every row they are compared with."""
    names = {r.name for r in table.rows} if not only else {r.name for r in table.rows if r.name in only}
    if not names:
        return names
    by_name = {r.name: r for r in table.rows}
    if table.reference:
        names.add(table.reference.name)
    pending = list(names)
    while pending:
        for other in by_name[pending.pop()].against:
            if other not in names:
                names.add(other)
                pending.append(other)
    return names


def _stats(table: Table, stats: dict[str, dict]) -> dict:
    """The table's `stats` columns ("pass.key") from the pipeline's statistics; pairs as "a/b"."""
    out = {}
    for column, path in table.stats.items():
        step, _, key = path.partition(".")
        value = stats.get(step, {}).get(key)
        if isinstance(value, dict):  # {what: [part, whole]}: quantize's int16_share
            value = ", ".join(f"{part}/{whole} {what}" for what, (part, whole) in value.items())
        out[column] = value
    return out


def _ratios(table: Table, values: dict[str, dict]) -> None:
    """`<column>_ratio` of every measured row against the reference row ("latency_ms" -> "latency_ratio")."""
    if not table.reference or table.reference.name not in values:
        return
    reference = values[table.reference.name]
    for column in table.ratios:
        base = reference.get(column)
        for row in values.values():
            if isinstance(base, (int, float)) and base and isinstance(row.get(column), (int, float)):
                row[f"{column.removesuffix('_ms')}_ratio"] = row[column] / base


def _quotients(table: Table, values: dict[str, dict]) -> None:
    """The table's `quotients` columns: one column of a row divided by another of the same row."""
    for column, (numerator, denominator) in table.quotients.items():
        for row in values.values():
            top, bottom = row.get(numerator), row.get(denominator)
            if isinstance(top, (int, float)) and isinstance(bottom, (int, float)) and bottom:
                row[column] = top / bottom


def _device(device: str) -> str:
    import os
    import platform

    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device == "cpu":
        return cpu
    import torch

    return f"{torch.cuda.get_device_name(0)} ({device}), {cpu}"


def _peer_versions() -> dict[str, str | None]:
    """The installed version of each peer package (None where it is absent)."""
    installed = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}
    return {package: installed.get(package) for package in PEER_PACKAGES}


def write_result(result: dict, path: str | Path | None = None) -> Path:
    """The result as bench/results/<suite>.json (or `path`)."""
    return write_json(path or RESULTS / f"{result['suite']}.json", result)


def load_results(folder: str | Path = RESULTS) -> dict[str, dict]:
    """Every result JSON in `folder`, by suite; each checked against the schema."""
    results = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in RESULT_KEYS if k not in data] if isinstance(data, dict) else ["schema"]
        if missing or data["schema"] != SCHEMA:
            raise SuiteError(f"{path}: not a {SCHEMA} result (missing '{(missing or ['schema'])[0]}')")
        results[data["suite"]] = data
    return results


def row_index(result: dict[str, Any]) -> dict[tuple[str, str], dict]:
    """A result's rows by (table, row name)."""
    return {(r["table"], r["name"]): r for r in result["rows"]}

