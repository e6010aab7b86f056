"""GGUF headers read with every count and length checked against the bytes that remain.

A GGUF file: magic "GGUF", version (2 or 3), tensor count, metadata count, the metadata
(key, type, value; arrays may nest), the tensor infos (name, dims, ggml type, offset), padding
to `general.alignment`, then the tensor data. `read_gguf_header` refuses, naming the file and the
key or tensor, what would make a reader allocate or loop without bound (an array claiming 2^60
items, a string longer than the file), a truncated header, an unknown type, and tensor data that
lies outside the file or overlaps another tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.files.reading import ErrorType, check_file, shown

__all__ = ["GGUFTensor", "GGUFHeader", "read_gguf_header", "GGML_BLOCKS"]

MAGIC = b"GGUF"
MAX_FILE_BYTES = 1 << 42
MAX_STRING = 1 << 24  # a chat template is kilobytes; a token a few bytes
MAX_ARRAY_DEPTH = 2  # arrays of arrays occur (merges as pairs); deeper nesting does not
MAX_DIMS = 8
MAX_TENSORS = 1 << 20
DEFAULT_ALIGNMENT = 32

# value type -> (struct code, size); 8 = string, 9 = array
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
            10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


def _ggml_blocks() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): (kind.name, block, size) for kind, (block, size) in GGML_QUANT_SIZES.items()}


GGML_BLOCKS = _ggml_blocks()


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info: `shape` in GGUF order (fastest-varying first), `offset` from the data start."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    data_offset: int = 0


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer, path: Path, error: ErrorType):
        self.buffer, self.pos, self.path, self.error = buffer, 0, path, error

    def take(self, count: int, what: str) -> bytes:
        """`count` bytes, copied (no view may outlive the mapping, even in a traceback)."""
        if count < 0 or self.pos + count > len(self.buffer):
            raise self.error(f"{self.path}: {what} needs {count:,} bytes at byte {self.pos:,}, the file has "
                             f"{len(self.buffer) - self.pos:,} left (truncated or corrupt)")
        data = self.buffer[self.pos:self.pos + count]
        self.pos += count
        return data

    def scalar(self, code: str, size: int, what: str):
        return struct.unpack("<" + code, self.take(size, what))[0]

    def string(self, what: str, strict: bool = True) -> str:
        """A length-prefixed string; names must be UTF-8 (`strict`), values may hold stray bytes
        (tokenizer vocabularies do), which become U+FFFD."""
        length = self.scalar("Q", 8, f"the length of {what}")
        if length > MAX_STRING:
            raise self.error(f"{self.path}: {what} claims {length:,} bytes, more than {MAX_STRING:,}")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise self.error(f"{self.path}: {what} is not UTF-8 text") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings (a vocabulary: 10^5 of them, so one tight loop)."""
        buffer, pos, end, out = self.buffer, self.pos, len(self.buffer), []
        for index in range(count):
            length = struct.unpack_from("<Q", buffer, pos)[0] if pos + 8 <= end else None
            if length is None or length > MAX_STRING or pos + 8 + length > end:
                self.pos = pos
                self.string(f"{what}[{index}]")  # raises, naming what was cut short
            out.append(buffer[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"))
            pos += 8 + length
        self.pos = pos
        return out

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(*_SCALARS[kind], what)
        if kind == STRING:
            return self.string(what, strict=False)
        if kind != ARRAY:
            raise self.error(f"{self.path}: {what} has unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{self.path}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item = self.scalar("I", 4, f"the item type of {what}")
        count = self.scalar("Q", 8, f"the length of {what}")
        smallest = _SCALARS[item][1] if item in _SCALARS else 8 if item in (STRING, ARRAY) else None
        if smallest is None:
            raise self.error(f"{self.path}: {what} is an array of unknown type {item}")
        if count * smallest > len(self.buffer) - self.pos:
            raise self.error(f"{self.path}: {what} claims {count:,} items, more than the "
                             f"{len(self.buffer) - self.pos:,} bytes left can hold")
        if item in _NUMPY:
            values = np.frombuffer(self.take(count * smallest, what), dtype=_NUMPY[item])
            return values.astype(bool).tolist() if item == 7 else values.tolist()
        if item == STRING:
            return self.strings(count, what)
        return [self.value(item, f"{what}[{i}]", depth + 1) for i in range(count)]


def read_gguf_header(path: str | os.PathLike, *, error: ErrorType = ModelLoadError) -> GGUFHeader:
    """The metadata and tensor infos of a GGUF file, bounded and checked; tensor data is not read."""
    path = Path(path)
    size = check_file(path, max_bytes=MAX_FILE_BYTES, error=error, what="GGUF file")
    if size < 24:
        raise error(f"{path}: {size} bytes, too short for a GGUF header")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(buffer, path, error)
        if cursor.take(4, "the magic") != MAGIC:
            raise error(f"{path}: not a GGUF file (no 'GGUF' magic)")
        version = cursor.scalar("I", 4, "the version")
        if version not in (2, 3):
            raise error(f"{path}: GGUF version {version} is not readable (2 or 3)")
        tensor_count = cursor.scalar("Q", 8, "the tensor count")
        kv_count = cursor.scalar("Q", 8, "the metadata count")
        if tensor_count > MAX_TENSORS or kv_count * 13 > size or tensor_count * 24 > size:
            raise error(f"{path}: the header claims {tensor_count:,} tensors and {kv_count:,} metadata "
                        f"entries, more than {size:,} bytes can hold")
        header = GGUFHeader(version)
        for index in range(kv_count):
            key = cursor.string(f"metadata key #{index}")
            if key in header.metadata:
                raise error(f"{path}: metadata key {shown(key)} is given twice")
            kind = cursor.scalar("I", 4, f"the type of metadata {shown(key)}")
            header.metadata[key] = cursor.value(kind, f"metadata {shown(key)}")
        infos = [_tensor_info(cursor, index, path, error) for index in range(tensor_count)]
        alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise error(f"{path}: metadata 'general.alignment' must be a power of two, got {shown(alignment)}")
        header.data_offset = -(-cursor.pos // alignment) * alignment
    _place(header, infos, size - header.data_offset, alignment, path, error)
    return header


def _tensor_info(cursor: _Cursor, index: int, path: Path, error: ErrorType) -> GGUFTensor:
    name = cursor.string(f"the name of tensor #{index}")
    where = f"{path}: tensor {shown(name)}"
    dims = cursor.scalar("I", 4, f"the rank of tensor {shown(name)}")
    if dims > MAX_DIMS:
        raise error(f"{where}: rank {dims:,}, more than {MAX_DIMS}")
    shape = tuple(cursor.scalar("Q", 8, f"the shape of tensor {shown(name)}") for _ in range(dims))
    kind = cursor.scalar("I", 4, f"the type of tensor {shown(name)}")
    offset = cursor.scalar("Q", 8, f"the offset of tensor {shown(name)}")
    if kind not in GGML_BLOCKS:
        raise error(f"{where}: unknown ggml type {kind}")
    type_name, block, block_bytes = GGML_BLOCKS[kind]
    count = math.prod(shape)
    if shape and shape[0] % block:
        raise error(f"{where}: its first dimension {shape[0]:,} is not a multiple of the {type_name} block ({block})")
    return GGUFTensor(name, shape, type_name, offset, count // block * block_bytes)


def _place(header: GGUFHeader, infos: list[GGUFTensor], data_bytes: int, alignment: int, path: Path,
           error: ErrorType) -> None:
    """Check every tensor's data lies inside the file, aligned, without overlapping another."""
    end = 0
    for info in sorted(infos, key=lambda t: t.offset):
        where = f"{path}: tensor {shown(info.name)}"
        if info.name in header.tensors:
            raise error(f"{where} is listed twice")
        if info.offset % alignment:
            raise error(f"{where}: data offset {info.offset:,} is not aligned to {alignment}")
        if info.offset < end:
            raise error(f"{where}: its data overlaps the tensor before it")
        end = info.offset + info.nbytes
        if end > data_bytes:
            raise error(f"{where}: its {info.nbytes:,} bytes end at {end:,}, past the {data_bytes:,} bytes of "
                        "data in the file (truncated?)")
        header.tensors[info.name] = info
