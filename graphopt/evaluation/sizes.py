"""What a model costs on disk."""

from __future__ import annotations

import tempfile
from pathlib import Path

from graphopt.ir import Model

__all__ = ["disk_bytes"]


def disk_bytes(model: Model) -> int:
    """Bytes the ONNX form takes on disk when saved by `Model.save` (model file + external data)."""
    model.require("onnx", "disk_bytes")
    with tempfile.TemporaryDirectory(prefix="graphopt-size-") as tmp:
        model.replace(source=None).save(Path(tmp) / "model.onnx")
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
