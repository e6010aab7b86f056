"""Benchmark rows as Markdown tables, and the environment a figure was measured in."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

__all__ = ["markdown_table", "environment"]


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows (each with a "name") as a Markdown table: bytes in MB, ppl to 3 decimals, times in ms/s."""
    if not rows:
        return ""
    columns = columns or [c for c in rows[0] if c != "name"]
    head = ["name"] + [_header(c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get("name", ""))] + [_cell(c, row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(column: str) -> str:
    return {"bytes": "MB on disk", "latency_ms": "latency ms", "latency_min_ms": "min ms",
            "pipeline_s": "pipeline s"}.get(column, column)


_FORMATS = {"ppl": "{:.3f}", "latency_ms": "{:.1f}", "latency_min_ms": "{:.1f}", "pipeline_s": "{:.1f}"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if column == "bytes":
        return f"{value / 1e6:.1f}"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column in _FORMATS and isinstance(value, (int, float)):
        return _FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


VERSIONED = ("graphopt", "torch", "onnxruntime", "onnx", "transformers", "numpy")


def environment(**extra: Any) -> dict[str, Any]:
    """Where a benchmark ran: Python, processor, cores and the versions its figures depend on.

    W8A8 overlap@1 moves by ~0.008 between onnxruntime releases (their fused integer kernels round
    differently), so a recorded figure carries the versions that produced it.
    """
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "processor": platform.machine(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "versions": versions, **extra}
