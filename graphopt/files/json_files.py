"""JSON files graphopt writes: numpy values made plain, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.files.writing import atomic_write_text

__all__ = ["jsonable", "write_json"]


def jsonable(obj: Any) -> Any:
    """`obj` with tuples as lists, numpy arrays and scalars as Python values, infinities as "inf"/"-inf"
    and NaN as "nan" (JSON has none of them)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> Path:
    """Write `data` (numpy values allowed) as JSON through a temporary file and a rename."""
    return atomic_write_text(path, json.dumps(jsonable(data), indent=indent) + "\n")
