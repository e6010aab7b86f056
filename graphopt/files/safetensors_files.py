"""safetensors files read after their header is checked against the file: names, dtypes, shapes, offsets.

The format: 8 bytes (little-endian u64) of header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data.
`read_safetensors_header` refuses, naming the file and the tensor, what the safetensors library
would trip on or silently trust: a header longer than the file or than MAX_HEADER_BYTES, offsets
outside the data, gaps or overlaps between tensors, byte counts that disagree with dtype × shape.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.files.reading import ErrorType, check_file, parse_json, shown, want_dict, want_int, want_list, want_str

__all__ = ["SafetensorsEntry", "read_safetensors_header", "read_safetensors", "MAX_HEADER_BYTES", "DTYPE_BYTES"]

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_FILE_BYTES = 1 << 42  # 4 TiB: past any model, short of an overflow
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
          "I32": np.int32, "U32": np.uint32, "F32": np.float32, "F64": np.float64, "I64": np.int64, "U64": np.uint64}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file; `begin`/`end` are offsets into the data after the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: str | os.PathLike, *, error: ErrorType = ModelLoadError
                            ) -> tuple[dict[str, SafetensorsEntry], dict[str, str], int]:
    """(tensors by name, `__metadata__`, byte offset where the data starts), every entry checked
    against the file's size before anything else is read."""
    path = Path(path)
    size = check_file(path, max_bytes=MAX_FILE_BYTES, error=error, what="safetensors file")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise error(f"{path}: truncated safetensors file ({size} bytes, not even a header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise error(f"{path}: the header claims {length:,} bytes, the file holds {size - 8:,} after its "
                        f"length (truncated or not a safetensors file)")
        text = fh.read(length)
    if not text.lstrip().startswith(b"{"):
        raise error(f"{path}: the header is not a JSON object (not a safetensors file?)")
    header = want_dict(parse_json(text, where=f"{path}: header", error=error, max_depth=4),
                       f"{path}: header", error)
    metadata = header.pop("__metadata__", None) or {}
    for key, value in want_dict(metadata, f"{path}: '__metadata__'", error).items():
        want_str(value, f"{path}: '__metadata__' entry {shown(key)}", error, empty=True)
    data_bytes = size - 8 - length
    entries = [_entry(name, spec, f"{path}: tensor {shown(name)}", error) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        where = f"{path}: tensor {shown(entry.name)}"
        if entry.end > data_bytes:
            raise error(f"{where}: its data ends at byte {entry.end:,}, the file holds {data_bytes:,} "
                        "(truncated?)")
        if entry.begin != position:
            problem = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise error(f"{where}: data offset {entry.begin:,} {problem} (expected {position:,})")
        position = entry.end
    if position != data_bytes:
        raise error(f"{path}: {data_bytes - position:,} bytes after the last tensor belong to none")
    return {e.name: e for e in entries}, metadata, 8 + length


def _entry(name: str, spec, where: str, error: ErrorType) -> SafetensorsEntry:
    spec = want_dict(spec, where, error)
    dtype = want_str(spec.get("dtype"), f"{where} 'dtype'", error, max_len=16)
    if dtype not in DTYPE_BYTES:
        raise error(f"{where}: unknown dtype {shown(dtype)} (known: {', '.join(DTYPE_BYTES)})")
    shape = tuple(want_int(d, f"{where} shape", error, lo=0, hi=1 << 40)
                  for d in want_list(spec.get("shape"), f"{where} 'shape'", error, max_len=16))
    offsets = want_list(spec.get("data_offsets"), f"{where} 'data_offsets'", error)
    if len(offsets) != 2:
        raise error(f"{where}: 'data_offsets' must be [begin, end], got {shown(offsets)}")
    begin, end = (want_int(o, f"{where} 'data_offsets'", error, lo=0, hi=MAX_FILE_BYTES) for o in offsets)
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != needed:
        raise error(f"{where}: holds {end - begin:,} bytes, its shape {list(shape)} of {dtype} needs {needed:,}")
    return SafetensorsEntry(name, dtype, shape, begin, end)


def read_safetensors(path: str | os.PathLike, names: list[str] | None = None, *,
                     error: ErrorType = ModelLoadError) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (all, or `names`) as numpy arrays, after the header checks.

    Each tensor is read at its offsets straight into its array (no second copy); BF16 and FP8
    have no numpy type and are refused by name."""
    path = Path(path)
    entries, _, start = read_safetensors_header(path, error=error)
    wanted = list(entries) if names is None else names
    arrays = {}
    with open(path, "rb") as fh:
        for name in wanted:
            if name not in entries:
                raise error(f"{path}: no tensor {shown(name)}")
            entry = entries[name]
            if entry.dtype not in _NUMPY:
                raise error(f"{path}: tensor {shown(name)} is {entry.dtype}, which numpy cannot hold")
            array = np.empty(entry.shape, dtype=_NUMPY[entry.dtype])
            fh.seek(start + entry.begin)
            if fh.readinto(memoryview(array.reshape(-1).view(np.uint8))) != entry.end - entry.begin:
                raise error(f"{path}: tensor {shown(name)} is cut short (the file shrank while reading)")
            arrays[name] = array
    return arrays
