"""The NPU program format: `program.json` (ops, tensors, signature) + `weights.npz` (every constant).

An op is {kind, unit, node, inputs, outputs, attrs, params}: `kind` names a kernel of the
simulator, `unit` is "npu" (integer kernel) or "host" (float, run by onnxruntime), `node` is the
ONNX node it came from, `attrs` are JSON scalars/lists, `params` map a kernel argument to the
name of a constant array in weights.npz (multipliers, tables, masks, weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import BackendError
from graphopt.files import reading
from graphopt.files.json_files import write_json
from graphopt.files.reading import read_json, read_npz, shown

__all__ = ["Op", "TensorInfo", "Program", "FORMAT_VERSION", "MAX_ELEMENTS", "example_array"]

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

    def save(self, folder: str | Path, prefix: str = "") -> tuple[Path, Path]:
        """Write program.json and weights.npz (named `prefix` + those: a decoder's programs share
        a folder) into `folder`, which the caller stages (`graphopt.files.writing.OutputSet`: the
        two files appear together or not at all)."""
        folder = Path(folder)
        with open(folder / f"{prefix}weights.npz", "wb") as fh:
            np.savez(fh, **self.constants)
        return write_json(folder / f"{prefix}program.json", self.to_json()), folder / f"{prefix}weights.npz"

    @classmethod
    def load(cls, path: str | Path, prefix: str = "") -> "Program":
        """Read a program from its folder (or its program.json); weights.npz must sit beside it
        (`prefix`: the names' prefix in a folder of several programs, see `save`).

        Both files go through the reading boundary: sizes bounded before reading, strict JSON,
        every field of every op and tensor typed, every name an op reads made before it (an input,
        a constant or an earlier op's output), tensor shapes at most MAX_ELEMENTS elements (batch
        and seq_len included), constants plain number arrays (no pickles). Any problem is a
        BackendError naming the file and the op, tensor or constant."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        js, npz = folder / f"{prefix}program.json", folder / f"{prefix}weights.npz"
        if not js.is_file():
            raise BackendError(f"{folder}: no program.json (is this an npu-sim output folder?)")
        if not npz.is_file():
            raise BackendError(f"{folder}: program.json has no weights.npz beside it")
        data = reading.want_dict(read_json(js, max_bytes=MAX_PROGRAM_BYTES, error=BackendError, what="npu-sim program"),
                         str(js), BackendError)
        if data.get("format") != "graphopt-npu-program" or data.get("version") != FORMAT_VERSION:
            raise BackendError(f"{js}: not an npu-sim program of format version {FORMAT_VERSION}")
        constants = read_npz(npz, max_bytes=MAX_WEIGHTS_BYTES, error=BackendError, what="npu-sim weights file")
        program = cls(
            name=reading.want_str(data.get("name"), f"{js}: 'name'", BackendError, empty=True),
            inputs=_names(data.get("inputs"), f"{js}: 'inputs'"),
            outputs=_names(data.get("outputs"), f"{js}: 'outputs'"),
            output_names=_names(data.get("output_names"), f"{js}: 'output_names'"),
            ops=[_op(op, f"{js}: op #{i}") for i, op in enumerate(reading.want_list(data.get("ops"), f"{js}: 'ops'",
                                                                             BackendError))],
            tensors={name: _tensor(name, info, f"{js}: tensor {shown(name)}")
                     for name, info in reading.want_dict(data.get("tensors"), f"{js}: 'tensors'", BackendError).items()},
            constants=constants, meta=reading.want_dict(data.get("meta", {}), f"{js}: 'meta'", BackendError),
        )
        _check_names(program, js, npz)
        return program

    def count(self, unit: str) -> int:
        return sum(1 for op in self.ops if op.unit == unit)


MAX_PROGRAM_BYTES = 1 << 30  # program.json: ops, tensor infos and the example inputs
MAX_WEIGHTS_BYTES = 1 << 36  # weights.npz of a multi-billion-parameter model at int8
MAX_ELEMENTS = 1 << 31  # elements of one program tensor: a batch x seq_len x hidden activation fits
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64")
_OP_FIELDS = {f.name for f in fields(Op)}
_TENSOR_FIELDS = {f.name for f in fields(TensorInfo)}


def _names(value, where: str) -> list[str]:
    return [reading.want_str(v, f"{where} entry {i}", BackendError, max_len=4096)
            for i, v in enumerate(reading.want_list(value, where, BackendError))]


def _shape(value, where: str) -> list[int]:
    shape = [reading.want_int(d, f"{where} dimension {i}", BackendError, lo=0, hi=MAX_ELEMENTS)
             for i, d in enumerate(reading.want_list(value, where, BackendError, max_len=16))]
    if math.prod(shape) > MAX_ELEMENTS:
        raise BackendError(f"{where}: {shape} holds {math.prod(shape):,} elements, more than {MAX_ELEMENTS:,} "
                           "(batch or seq_len too large?)")
    return shape


def _op(entry, where: str) -> Op:
    entry = reading.want_dict(entry, where, BackendError)
    unknown = sorted(set(entry) - _OP_FIELDS)
    if unknown:
        raise BackendError(f"{where}: unknown field {shown(unknown[0])}")
    node = reading.want_str(entry.get("node"), f"{where} 'node'", BackendError, empty=True, max_len=4096)
    where = f"{where} (node {shown(node)})"
    unit = entry.get("unit")
    if unit not in ("npu", "host"):
        raise BackendError(f"{where}: 'unit' must be 'npu' or 'host', got {shown(unit)}")
    attrs = reading.want_dict(entry.get("attrs", {}), f"{where} 'attrs'", BackendError)
    if "shape" in attrs:
        _shape(attrs["shape"], f"{where} attribute 'shape'")
    if entry.get("kind") == "host":
        reading.want_str(attrs.get("op_type"), f"{where} attribute 'op_type'", BackendError)
        reading.want_dict(attrs.get("attributes", {}), f"{where} attribute 'attributes'", BackendError)
    params = reading.want_dict(entry.get("params", {}), f"{where} 'params'", BackendError)
    for key, value in params.items():
        reading.want_str(value, f"{where} param {shown(key)}", BackendError)
    return Op(kind=reading.want_str(entry.get("kind"), f"{where} 'kind'", BackendError, max_len=64), unit=unit, node=node,
              inputs=[reading.want_str(v, f"{where} input {i}", BackendError, empty=True, max_len=4096)
                      for i, v in enumerate(reading.want_list(entry.get("inputs"), f"{where} 'inputs'", BackendError))],
              outputs=_names(entry.get("outputs"), f"{where} 'outputs'"), attrs=attrs, params=params)


def _tensor(name: str, entry, where: str) -> TensorInfo:
    entry = reading.want_dict(entry, where, BackendError)
    unknown = sorted(set(entry) - _TENSOR_FIELDS)
    if unknown:
        raise BackendError(f"{where}: unknown field {shown(unknown[0])}")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise BackendError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}, got {shown(dtype)}")
    scale, zero_point = entry.get("scale"), entry.get("zero_point")
    return TensorInfo(
        name=name, dtype=dtype, shape=_shape(entry.get("shape"), f"{where} 'shape'"),
        scale=None if scale is None else reading.want_number(scale, f"{where} 'scale'", BackendError),
        zero_point=None if zero_point is None else reading.want_int(zero_point, f"{where} 'zero_point'", BackendError,
                                                            lo=-(1 << 31), hi=(1 << 32) - 1),
        const=reading.want_bool(entry.get("const", False), f"{where} 'const'", BackendError))


def _check_names(program: Program, js: Path, npz: Path) -> None:
    """Every name an op reads is made before it; every input and output has a tensor entry."""
    if len(program.output_names) != len(program.outputs):
        raise BackendError(f"{js}: {len(program.outputs)} outputs but {len(program.output_names)} output names")
    for name in program.inputs + program.outputs:
        if name not in program.tensors:
            raise BackendError(f"{js}: program input/output {shown(name)} has no entry in 'tensors'")
    made = set(program.inputs) | set(program.constants)
    for op in program.ops:
        for name in op.inputs:
            if name and name not in made:
                raise BackendError(f"{js}: op {shown(op.node)} reads {shown(name)}, which no input, constant or "
                                   "earlier op makes")
        for key, constant in op.params.items():
            if constant not in program.constants:
                raise BackendError(f"{npz}: constant {shown(constant)} (param {shown(key)} of op {shown(op.node)}) "
                                   "is missing")
        made.update(op.outputs)
    missing = [name for name in program.outputs if name not in made]
    if missing:
        raise BackendError(f"{js}: program output {shown(missing[0])} is made by no op")
    examples = reading.want_dict(program.meta.get("example_inputs", {}), f"{js}: 'meta.example_inputs'", BackendError)
    for name, value in examples.items():
        example_array(program, name, value, f"{js}: example input {shown(name)}")


def example_array(program: Program, name: str, value, where: str) -> np.ndarray:
    """A stored example input as an array of the program's dtype and shape for `name`."""
    if name not in program.inputs:
        raise BackendError(f"{where}: the program has no input {shown(name)}")
    expected = program.tensors[name]
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise BackendError(f"{where}: not a rectangular array of numbers") from None
    if array.dtype.kind not in "biuf" or list(array.shape) != list(expected.shape):
        raise BackendError(f"{where}: expected numbers of shape {expected.shape}, got {array.dtype.name} "
                           f"{list(array.shape)}")
    return array
