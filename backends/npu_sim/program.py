"""The NPU program format: `program.json` (ops, tensors, signature) + `weights.npz` (every constant).

An op is {kind, unit, node, inputs, outputs, attrs, params}: `kind` names a kernel of the
simulator, `unit` is "npu" (integer kernel) or "host" (float, run by onnxruntime), `node` is the
ONNX node it came from, `attrs` are JSON scalars/lists, `params` map a kernel argument to the
name of a constant array in weights.npz (multipliers, tables, masks, weights).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import BackendError
from graphopt.files.json_files import write_json

__all__ = ["Op", "TensorInfo", "Program", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class Op:
    kind: str
    unit: str
    node: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class TensorInfo:
    """A program tensor: dtype, concrete shape, and for quantized ones scale and zero point."""

    name: str
    dtype: str
    shape: list[int]
    scale: float | None = None
    zero_point: int | None = None
    const: bool = False


@dataclass
class Program:
    name: str
    inputs: list[str]
    outputs: list[str]
    output_names: list[str]
    ops: list[Op] = field(default_factory=list)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    host_partition: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": "graphopt-npu-program", "version": FORMAT_VERSION, "name": self.name,
            "inputs": self.inputs, "outputs": self.outputs, "output_names": self.output_names,
            "meta": self.meta, "tensors": {k: asdict(v) for k, v in self.tensors.items()},
            "ops": [asdict(op) for op in self.ops],
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write program.json and weights.npz into `folder`, which the caller stages
        (`graphopt.files.writing.OutputSet`: the two files appear together or not at all)."""
        folder = Path(folder)
        with open(folder / "weights.npz", "wb") as fh:
            np.savez(fh, **self.constants)
        return write_json(folder / "program.json", self.to_json()), folder / "weights.npz"

    @classmethod
    def load(cls, path: str | Path) -> "Program":
        """Read a program from its folder (or its program.json); weights.npz must sit beside it."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        js, npz = folder / "program.json", folder / "weights.npz"
        if not js.is_file():
            raise BackendError(f"{folder}: no program.json (is this an npu-sim output folder?)")
        if not npz.is_file():
            raise BackendError(f"{folder}: program.json has no weights.npz beside it")
        try:
            data = json.loads(js.read_text())
        except json.JSONDecodeError as exc:
            raise BackendError(f"{js}: not valid JSON ({exc})") from exc
        if data.get("format") != "graphopt-npu-program" or data.get("version") != FORMAT_VERSION:
            raise BackendError(f"{js}: not an npu-sim program of format version {FORMAT_VERSION}")
        with np.load(npz, allow_pickle=False) as weights:
            constants = {k: weights[k] for k in weights.files}
        program = cls(
            name=data["name"], inputs=data["inputs"], outputs=data["outputs"], output_names=data["output_names"],
            ops=[Op(**op) for op in data["ops"]],
            tensors={k: TensorInfo(**v) for k, v in data["tensors"].items()},
            constants=constants, meta=data.get("meta", {}),
        )
        missing = sorted({p for op in program.ops for p in op.params.values()} - set(constants))
        if missing:
            raise BackendError(f"{npz}: constant '{missing[0]}' named by program.json is missing")
        return program

    def count(self, unit: str) -> int:
        return sum(1 for op in self.ops if op.unit == unit)
