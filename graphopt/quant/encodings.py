"""Quantization encodings: AIMET/QNN JSON (1.0.0 and 0.6.1) read and written exactly, QDQ extraction.

The two conventions, and the exact mapping between them (b = bitwidth):

- QNN/AIMET store `scale` and `offset` on the UNSIGNED grid 0 .. 2^b − 1:
  x̂ = (u + offset) · scale, so min = offset · scale, max = (offset + 2^b − 1) · scale and
  `offset = round(min / scale)` (≤ 0).
- ONNX stores a zero point on the grid of its own type: x̂ = (q − zero_point) · scale.
  For an unsigned type (uint4/uint8/uint16, q = u):     zero_point = −offset.
  For a signed type (int4/int8/int16, q = u − 2^(b−1)): zero_point = −offset − 2^(b−1).
  Both are `zero_point = qmin − offset` with qmin the type's smallest code, which is what
  `Encoding.zero_point()` computes and `Encoding.from_params` inverts.
- Which ONNX type an encoding becomes: symmetric encodings → signed types (zero point 0,
  offset −2^(b−1)), asymmetric → unsigned (`graphopt.quant.dtype_for`). graphopt's quantize pass
  only produces those, so file → QDQ → file and QDQ → file → QDQ are both exact.

Parameter layout is ONNX DequantizeLinear's: PER_CHANNEL scales run along `axis`; PER_BLOCK scales
are the C-order flattening of the DQ scale tensor (the weight's shape with `axis` divided by
`block_size`, rounded up: a shorter last block when it does not divide; for a MatMul weight [in, out]
blocked along in: [ceil(in / block_size), out]).
`axis` is written to 1.0.0 entries as a graphopt extension key (AIMET infers it from the layer);
0.6.1 has no place for it nor for blocks, so 0.6.1 entries read back with axis None (the consumer
resolves it from the graph) and PER_BLOCK refuses to be written as 0.6.1.

`model.meta.encodings` holds the same entries as JSON-able dicts (`Encodings.to_meta()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import GraphoptError
from graphopt.files.json_files import write_json
from graphopt.files.reading import (
    MAX_ECHO,
    read_json,
    shown,
    want_bool,
    want_dict,
    want_int,
    want_list,
    want_number,
    want_str,
)
from graphopt.quant.spec import QuantSpec, dtype_for

__all__ = ["Encoding", "Encodings", "EncodingError", "VERSIONS"]

VERSIONS = ("1.0.0", "0.6.1")
ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK")
MAX_ENCODINGS_BYTES = 256 << 20  # per-block scales of an 8B model at 4 bits: tens of MB
MAX_NAME = 4096  # characters of a tensor name
FLOAT32_MAX = float(np.finfo(np.float32).max)
_GRANULARITY = {"PER_TENSOR": "tensor", "PER_CHANNEL": "channel", "PER_BLOCK": "block"}


class EncodingError(GraphoptError):
    """An encodings file or entry is malformed; the message names the file and the entry."""


@dataclass(eq=False)
class Encoding:
    """The quantization of one tensor, in QNN terms (scale/offset on the unsigned grid)."""

    name: str
    bitwidth: int
    dtype: Literal["int", "float"] = "int"
    is_symmetric: bool = True
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    axis: int | None = None
    block_size: int | None = None
    enc_type: Literal["PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"] = "PER_TENSOR"

    def __post_init__(self):
        self.scale = np.asarray(self.scale, dtype=np.float32).ravel()
        self.offset = np.asarray(self.offset, dtype=np.int64).ravel()
        where = f"encoding '{self.name}'"
        if self.dtype not in ("int", "float"):
            raise EncodingError(f"{where}: dtype must be 'int' or 'float', got {self.dtype!r}")
        if self.enc_type not in ENC_TYPES:
            raise EncodingError(f"{where}: enc_type must be one of {', '.join(ENC_TYPES)}, got {self.enc_type!r}")
        if self.dtype == "float":
            if self.bitwidth not in (16, 32):
                raise EncodingError(f"{where}: a float encoding has bitwidth 16 or 32, got {self.bitwidth}")
            return
        if self.bitwidth not in (4, 8, 16):
            raise EncodingError(f"{where}: int bitwidth must be 4, 8 or 16, got {self.bitwidth}")
        if self.scale.size == 0 or self.scale.size != self.offset.size:
            raise EncodingError(
                f"{where}: needs as many offsets as scales (got {self.scale.size} scales, {self.offset.size} offsets)")
        if not np.all(self.scale > 0) or not np.all(np.isfinite(self.scale)):
            raise EncodingError(f"{where}: every scale must be a positive finite number")
        if self.enc_type == "PER_TENSOR" and self.scale.size != 1:
            raise EncodingError(f"{where}: PER_TENSOR has one scale, got {self.scale.size}")
        if self.enc_type == "PER_BLOCK" and not (self.block_size and self.block_size > 1):
            raise EncodingError(f"{where}: PER_BLOCK needs a block_size > 1, got {self.block_size}")
        low = -(1 << self.bitwidth) + 1
        if np.any(self.offset > 0) or np.any(self.offset < low):
            raise EncodingError(
                f"{where}: offsets must lie in [{low}, 0] (offset = round(min/scale) with min <= 0 <= max)")

    # ------------------------------------------------------------------ conversions
    @property
    def spec(self) -> QuantSpec:
        """The QuantSpec this encoding is an instance of (signed type iff symmetric)."""
        if self.dtype != "int":
            raise EncodingError(f"encoding '{self.name}': a float encoding has no integer QuantSpec")
        granularity = _GRANULARITY[self.enc_type]
        axis = self.axis if granularity != "tensor" else None
        if granularity != "tensor" and axis is None:
            axis = -1  # unknown until a graph says; callers resolve it with with_axis()
        return QuantSpec(dtype_for(self.bitwidth, self.is_symmetric), granularity, axis,
                         self.block_size or 0 if granularity == "block" else 0, self.is_symmetric)

    def with_axis(self, axis: int) -> "Encoding":
        return Encoding(self.name, self.bitwidth, self.dtype, self.is_symmetric, self.scale, self.offset,
                        axis, self.block_size, self.enc_type)

    def zero_point(self) -> np.ndarray:
        """ONNX zero points (int64, flat): qmin − offset for the spec's type."""
        return self.spec.qmin - self.offset

    def params(self, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32, zero point int64) shaped for DequantizeLinear on a tensor of `shape`
        (scalars per tensor, 1-D per channel; per block the weight's shape with `axis` divided, rounded up)."""
        scale, zero_point = self.scale, self.zero_point()
        if self.enc_type == "PER_TENSOR":
            return scale.reshape(()), zero_point.reshape(())
        if self.enc_type == "PER_CHANNEL":
            return scale, zero_point
        if shape is None:
            raise EncodingError(f"encoding '{self.name}': a PER_BLOCK layout needs the tensor's shape")
        axis = self.axis % len(shape)
        blocked = tuple(-(-d // self.block_size) if i == axis else d for i, d in enumerate(shape))
        if int(np.prod(blocked)) != scale.size:
            raise EncodingError(
                f"encoding '{self.name}': {scale.size} block scales do not fit shape {list(shape)} "
                f"blocked by {self.block_size} along axis {axis}")
        return scale.reshape(blocked), zero_point.reshape(blocked)

    @classmethod
    def from_params(cls, name: str, scale, zero_point, spec: QuantSpec) -> "Encoding":
        """An encoding from ONNX-style scale / zero point of `spec` (inverse of params())."""
        if spec.granularity == "token":
            raise EncodingError(f"encoding '{name}': per-token (dynamic) quantization has no static encoding")
        enc_type = {"tensor": "PER_TENSOR", "channel": "PER_CHANNEL", "block": "PER_BLOCK"}[spec.granularity]
        offset = spec.qmin - np.asarray(zero_point, dtype=np.int64)
        return cls(name, spec.bits, "int", spec.symmetric, np.asarray(scale, np.float32), offset,
                   spec.axis if spec.granularity != "tensor" else None,
                   spec.block_size if spec.granularity == "block" else None, enc_type)

    @property
    def min(self) -> np.ndarray:
        return (self.offset * self.scale.astype(np.float64)).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        return ((self.offset + (1 << self.bitwidth) - 1) * self.scale.astype(np.float64)).astype(np.float32)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Encoding):
            return NotImplemented
        return (self.name, self.bitwidth, self.dtype, self.is_symmetric, self.axis, self.block_size, self.enc_type) == (
            other.name, other.bitwidth, other.dtype, other.is_symmetric, other.axis, other.block_size, other.enc_type
        ) and np.array_equal(self.scale, other.scale) and np.array_equal(self.offset, other.offset)

    # -------------------------------------------------------------------- JSON forms
    def to_v1(self) -> dict:
        entry = {"name": self.name, "dtype": self.dtype.upper(), "enc_type": self.enc_type, "bw": self.bitwidth}
        if self.dtype == "float":
            return entry
        entry.update(is_sym=self.is_symmetric, scale=[float(s) for s in self.scale],
                     offset=[int(o) for o in self.offset])
        if self.enc_type == "PER_BLOCK":
            entry["block_size"] = int(self.block_size)
        if self.axis is not None:
            entry["axis"] = int(self.axis)
        return entry

    @classmethod
    def from_v1(cls, entry: dict, where: str) -> "Encoding":
        """One 1.0.0 entry, every field strictly typed: `is_sym` only true/false, `bw` and offsets
        integers (8.7 and -127.6 are refused, not truncated), scales finite numbers."""
        want_dict(entry, f"{where}: each entry", EncodingError)
        name = want_str(entry.get("name"), f"{where}: an entry's 'name'", EncodingError, max_len=MAX_NAME)
        where = f"{where}, entry {shown(name)}"
        dtype = want_str(entry.get("dtype", "INT"), f"{where}: 'dtype'", EncodingError).lower()
        if dtype not in ("int", "float"):
            raise EncodingError(f"{where}: 'dtype' must be 'INT' or 'FLOAT', got {shown(entry['dtype'])}")
        if "bw" not in entry:
            raise EncodingError(f"{where}: missing field 'bw'")
        bits = _bitwidth(entry["bw"], dtype, f"{where}: 'bw'")
        enc_type = want_str(entry.get("enc_type", "PER_TENSOR"), f"{where}: 'enc_type'", EncodingError)
        if dtype == "float":
            return cls(name, bits, "float", True, enc_type=enc_type)
        symmetric = want_bool(entry.get("is_sym", False), f"{where}: 'is_sym'", EncodingError)
        scale = [_scale(v, f"{where}: scale {i}")
                 for i, v in enumerate(want_list(entry.get("scale", []), f"{where}: 'scale'", EncodingError))]
        offset = [want_int(v, f"{where}: offset {i}", EncodingError, lo=-(1 << bits) + 1, hi=0)
                  for i, v in enumerate(want_list(entry.get("offset", []), f"{where}: 'offset'", EncodingError))]
        axis = entry.get("axis")
        axis = None if axis is None else want_int(axis, f"{where}: 'axis'", EncodingError, lo=-8, hi=7)
        block = entry.get("block_size")
        block = None if block is None else want_int(block, f"{where}: 'block_size'", EncodingError, lo=1, hi=1 << 20)
        try:
            return cls(name, bits, "int", symmetric, scale, offset, axis, block, enc_type)
        except EncodingError as exc:
            raise EncodingError(f"{where}: {exc}") from None

    def to_v0(self) -> list[dict]:
        if self.dtype == "float":
            return [{"bitwidth": self.bitwidth, "dtype": "float"}]
        if self.enc_type == "PER_BLOCK":
            raise EncodingError(f"encoding '{self.name}': PER_BLOCK cannot be written as 0.6.1; use version 1.0.0")
        return [{"bitwidth": self.bitwidth, "dtype": "int", "is_symmetric": str(self.is_symmetric),
                 "max": float(hi), "min": float(lo), "offset": int(o), "scale": float(s)}
                for lo, hi, o, s in zip(self.min, self.max, self.offset, self.scale)]

    @classmethod
    def from_v0(cls, name: str, entries, where: str) -> "Encoding":
        """One 0.6.1 entry: a list of per-channel objects that must agree on bitwidth, dtype and
        symmetry. `bitwidth` is checked before any 2^bitwidth is computed; an entry with only
        min/max gets scale = (max - min) / (2^b - 1) and offset = round(min / scale), refused when
        min == max (no range to quantize)."""
        where = f"{where}, entry {shown(name)}"
        if isinstance(entries, dict):
            entries = [entries]
        if not isinstance(entries, list) or not entries:
            raise EncodingError(f"{where}: expected a list of per-channel objects")
        channels = [want_dict(item, f"{where}: channel {i}", EncodingError) for i, item in enumerate(entries)]
        kinds = {_v0_kind(item, f"{where}: channel {i}") for i, item in enumerate(channels)}
        if len(kinds) > 1:
            described = ", ".join(f"{d} {b}-bit{' symmetric' if s else ''}" for d, b, s in sorted(kinds))
            raise EncodingError(f"{where}: its channels disagree ({described}); one entry has one bitwidth, "
                                "dtype and symmetry")
        ((dtype, bits, symmetric),) = kinds
        if dtype == "float":
            return cls(name, bits, "float")
        scales, offsets = [], []
        for i, item in enumerate(channels):
            here = f"{where}: channel {i}"
            if "scale" in item:
                scale = _scale(item["scale"], f"{here} 'scale'")
            else:  # files with only min/max: scale and offset follow from them
                low = want_number(_field(item, "min", here), f"{here} 'min'", EncodingError)
                high = want_number(_field(item, "max", here), f"{here} 'max'", EncodingError)
                if not high > low:
                    raise EncodingError(f"{here}: min {low} and max {high} leave no range; give scale and offset")
                scale = _scale((high - low) / ((1 << bits) - 1), f"{here} (max - min) / (2^bitwidth - 1)")
            if "offset" in item:
                offset = want_int(item["offset"], f"{here} 'offset'", EncodingError, lo=-(1 << bits) + 1, hi=0)
            else:
                offset = round(want_number(_field(item, "min", here), f"{here} 'min'", EncodingError) / scale)
            scales.append(scale)
            offsets.append(offset)
        try:
            return cls(name, bits, "int", symmetric, scales, offsets,
                       None, None, "PER_TENSOR" if len(channels) == 1 else "PER_CHANNEL")
        except EncodingError as exc:
            raise EncodingError(f"{where}: {exc}") from None


def _scale(value, where: str) -> float:
    """A scale: a positive number that float32 holds (1e308 would become inf)."""
    scale = want_number(value, where, EncodingError)
    if not 0 < scale <= FLOAT32_MAX:
        raise EncodingError(f"{where} must be a positive number a float32 holds, got {shown(value)}")
    return scale


def _field(item: dict, key: str, where: str):
    if key not in item:
        raise EncodingError(f"{where}: missing field '{key}'")
    return item[key]


def _bitwidth(value, dtype: str, where: str) -> int:
    """A bitwidth checked before anything computes 2^bitwidth: 4, 8 or 16 (int), 16 or 32 (float)."""
    allowed = (16, 32) if dtype == "float" else (4, 8, 16)
    bits = want_int(value, where, EncodingError)
    if bits not in allowed:
        raise EncodingError(f"{where}: an {dtype} encoding's bitwidth must be {' or '.join(map(str, allowed))}, "
                            f"got {shown(bits)}")
    return bits


def _v0_kind(item: dict, where: str) -> tuple[str, int, bool]:
    """(dtype, bitwidth, symmetric) of one 0.6.1 channel; `is_symmetric` is "True"/"False" (AIMET
    writes strings) or a JSON bool, nothing else."""
    dtype = want_str(item.get("dtype", "int"), f"{where} 'dtype'", EncodingError).lower()
    if dtype not in ("int", "float"):
        raise EncodingError(f"{where}: 'dtype' must be 'int' or 'float', got {shown(item['dtype'])}")
    bits = _bitwidth(_field(item, "bitwidth", where), dtype, f"{where} 'bitwidth'")
    symmetric = item.get("is_symmetric", False)
    if isinstance(symmetric, str) and symmetric.lower() in ("true", "false"):
        symmetric = symmetric.lower() == "true"
    symmetric = want_bool(symmetric, f"{where} 'is_symmetric' (true/false or \"True\"/\"False\")", EncodingError)
    return dtype, bits, symmetric and dtype == "int"


@dataclass
class Encodings:
    """Encodings by tensor name, split like the files into activations and params (weights)."""

    activations: dict[str, Encoding] = field(default_factory=dict)
    params: dict[str, Encoding] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.activations) + len(self.params)

    def __contains__(self, name: str) -> bool:
        return name in self.activations or name in self.params

    def __getitem__(self, name: str) -> Encoding:
        if name in self.params:
            return self.params[name]
        return self.activations[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.activations
        yield from self.params

    def get(self, name: str) -> Encoding | None:
        return self.params.get(name) or self.activations.get(name)

    def add(self, encoding: Encoding, kind: Literal["activation", "param"]) -> None:
        (self.activations if kind == "activation" else self.params)[encoding.name] = encoding

    def __eq__(self, other) -> bool:
        if not isinstance(other, Encodings):
            return NotImplemented
        return (set(self.activations) == set(other.activations) and set(self.params) == set(other.params)
                and all(self.activations[k] == other.activations[k] for k in self.activations)
                and all(self.params[k] == other.params[k] for k in self.params))

    # ---------------------------------------------------------------------- files
    def to_json(self, version: str = "1.0.0") -> dict:
        if version == "1.0.0":
            return {"version": "1.0.0",
                    "activation_encodings": [e.to_v1() for e in self.activations.values()],
                    "param_encodings": [e.to_v1() for e in self.params.values()]}
        if version == "0.6.1":
            return {"version": "0.6.1",
                    "activation_encodings": {n: e.to_v0() for n, e in self.activations.items()},
                    "param_encodings": {n: e.to_v0() for n, e in self.params.items()}}
        raise EncodingError(f"encodings version must be one of {', '.join(VERSIONS)}, got {version!r}")

    def write(self, path: str | Path, version: str = "1.0.0") -> Path:
        """Write an AIMET/QNN encodings JSON file (atomically)."""
        return write_json(path, self.to_json(version))

    @classmethod
    def from_json(cls, data, where: str = "encodings") -> "Encodings":
        """Encodings from a parsed file; a tensor named twice (in one section or across both) is refused."""
        want_dict(data, f"{where}: the top level", EncodingError)
        version = want_str(data.get("version", "0.6.1"), f"{where}: 'version'", EncodingError, max_len=MAX_ECHO)
        if not (version.startswith("1.") or version.startswith("0.")):
            raise EncodingError(f"{where}: unknown version {shown(version)} (readable: {', '.join(VERSIONS)})")
        found = cls()
        seen: dict[str, str] = {}
        for section, kind in (("activation_encodings", "activation"), ("param_encodings", "param")):
            here = f"{where}, {section}"
            if version.startswith("1."):
                body = want_list(data.get(section, []), f"{here} (version {version} keeps a list of entries)",
                                 EncodingError)
                encodings = [Encoding.from_v1(entry, here) for entry in body]
            else:
                body = want_dict(data.get(section, {}), f"{here} (version {version} maps tensor names to entries)",
                                 EncodingError)
                encodings = [Encoding.from_v0(name, entries, here) for name, entries in body.items()]
            for encoding in encodings:
                if encoding.name in seen:
                    raise EncodingError(f"{here}: tensor {shown(encoding.name)} is encoded twice (first in "
                                        f"{seen[encoding.name]}); one encoding per tensor")
                seen[encoding.name] = section
                found.add(encoding, kind)
        return found

    @classmethod
    def read(cls, path: str | Path) -> "Encodings":
        """Read an AIMET/QNN encodings JSON file (1.0.0 lists or 0.6.1 dicts, told by 'version'):
        size checked before reading (MAX_ENCODINGS_BYTES), strict JSON (no repeated keys), strict fields."""
        data = read_json(path, max_bytes=MAX_ENCODINGS_BYTES, error=EncodingError, what="encodings file")
        return cls.from_json(data, str(path))

    # ----------------------------------------------------------- model metadata
    def to_meta(self) -> dict[str, dict]:
        """JSON-able {tensor name: 1.0.0 entry + "kind"} for `model.meta.encodings`."""
        out = {n: {**e.to_v1(), "kind": "activation"} for n, e in self.activations.items()}
        out.update({n: {**e.to_v1(), "kind": "param"} for n, e in self.params.items()})
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, dict], where: str = "model.meta.encodings") -> "Encodings":
        """The inverse of `to_meta`, as strict as a file: `where` names the model the entries came from."""
        found = cls()
        for name, entry in want_dict(meta, where, EncodingError).items():
            entry = want_dict(entry, f"{where}, entry {shown(name)}", EncodingError)
            kind = entry.get("kind", "activation")
            if kind not in ("activation", "param"):
                raise EncodingError(f"{where}, entry {shown(name)}: 'kind' must be 'activation' or 'param', "
                                    f"got {shown(kind)}")
            found.add(Encoding.from_v1({**entry, "name": entry.get("name", name)}, where), kind)
        return found

    @classmethod
    def from_qdq_model(cls, model) -> "Encodings":
        """Encodings of a QDQ ONNX model: one per DequantizeLinear, keyed by the float tensor it stands for.

        - DequantizeLinear of a constant (a pre-quantized weight): a param encoding named after the
          DQ output (graphopt names it after the original weight).
        - QuantizeLinear(x) → DequantizeLinear: an activation encoding named after x.
        Scale and zero point must be constants; a zero point absent means 0 of the input's type.
        """
        model.require("onnx", "Encodings.from_qdq_model")
        return cls.from_qdq_graph(model.graph)

    @classmethod
    def from_qdq_graph(cls, graph: gs.Graph, params: set[str] | None = None) -> "Encodings":
        """`from_qdq_model` on a bare graph; with `params`, only those pre-quantized weights."""
        found = cls()
        for node in graph.nodes:
            if node.op != "DequantizeLinear" or params is not None and node.outputs[0].name not in params:
                continue
            source = node.inputs[0]
            if isinstance(source, gs.Constant):
                found.add(_from_dq(node, node.outputs[0].name, source.shape, np.dtype(source.dtype)), "param")
                continue
            producer = source.inputs[0] if source.inputs else None
            if producer is not None and producer.op == "QuantizeLinear":
                name = producer.inputs[0].name
                if name not in found.activations:
                    found.add(_from_dq(node, name, None, _code_dtype(producer, node)), "activation")
        return found


def _code_dtype(q_node: gs.Node, dq_node: gs.Node) -> np.dtype:
    for node in (dq_node, q_node):
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            return np.dtype(node.inputs[2].values.dtype)
    return np.dtype(np.uint8)  # QuantizeLinear without a zero point produces uint8


def _from_dq(node: gs.Node, name: str, shape, code_dtype: np.dtype) -> Encoding:
    where = f"DequantizeLinear '{node.name}'"
    scale_t = node.inputs[1]
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not isinstance(scale_t, gs.Constant) or (zp_t is not None and not isinstance(zp_t, gs.Constant)):
        raise EncodingError(f"{where}: scale and zero point must be constants to give an encoding")
    scale = np.asarray(scale_t.values, dtype=np.float32)
    kind = code_dtype.name
    bits = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16}.get(kind)
    if bits is None:
        raise EncodingError(f"{where}: codes of type {kind} have no QNN encoding")
    signed = not kind.startswith("u")
    zero_point = (np.zeros(scale.shape, np.int64) if zp_t is None
                  else np.asarray(zp_t.values).astype(np.int64))
    # graphopt's convention (dtype_for): symmetric = signed with zero point 0. An unsigned type is
    # asymmetric even when its zero point sits mid-grid, so the encoding maps back to the same type.
    symmetric = signed and bool(np.all(zero_point == 0))
    qmin = -(1 << (bits - 1)) if signed else 0
    offset = qmin - zero_point
    block_size = node.attrs.get("block_size", 0)
    axis = node.attrs.get("axis", 1)
    if scale.ndim == 0 or scale.size == 1 and not block_size:
        return Encoding(name, bits, "int", symmetric, scale, offset, None, None, "PER_TENSOR")
    if block_size:
        return Encoding(name, bits, "int", symmetric, scale, offset, axis, int(block_size), "PER_BLOCK")
    return Encoding(name, bits, "int", symmetric, scale, offset, axis, None, "PER_CHANNEL")
