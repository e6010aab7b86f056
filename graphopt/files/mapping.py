"""Memory-mapped weights: which file a mapped array reads, and dropping its pages once used.

A weight of a large ONNX file is mapped read-only (`onnx_reading.map_external`), not read: its
pages come from the file when touched and count in the process's memory while they stay mapped.
`source` says where a mapped array's bytes lie, so onnxruntime can read the file itself instead of
being handed a copy; `drop_pages` releases the pages of a part already used (they are clean, and
are read from the file again if touched), so streaming a weight through a computation or a writer
costs a chunk of memory, not the weight.
"""

from __future__ import annotations

import mmap
import weakref
from pathlib import Path

import numpy as np

__all__ = ["register", "source", "drop_pages", "row_blocks"]

_SOURCES: dict[int, tuple[weakref.ref, Path, int]] = {}
_PAGE = mmap.PAGESIZE


def register(array: np.ndarray, file: Path, offset: int) -> np.ndarray:
    """Record that `array` (a view of a mapping of `file`) holds the file's bytes from `offset`."""
    key = id(array)
    _SOURCES[key] = (weakref.ref(array, lambda _: _SOURCES.pop(key, None)), Path(file), int(offset))
    return array


def source(array) -> tuple[Path, int] | None:
    """(file, offset) of a registered mapped array, or None (a computed array, a copy)."""
    entry = _SOURCES.get(id(array))
    if entry is None or entry[0]() is not array:
        return None
    return entry[1], entry[2]


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    base = array
    while isinstance(base, np.ndarray) or isinstance(base, memoryview):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return base if isinstance(base, mmap.mmap) else None


def row_blocks(array: np.ndarray, max_bytes: int = 32 << 20):
    """`array` (at least 1-D) a block of rows at a time, each block's mapped pages dropped once the
    caller is done with it: reading a memory-mapped weight this way costs a block, not the weight."""
    array = np.asarray(array)
    if array.ndim == 0:
        yield array
        return
    rows = max(1, max_bytes // max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))))
    for start in range(0, array.shape[0], rows):
        block = array[start:start + rows]
        yield block
        drop_pages(block)


def drop_pages(array: np.ndarray) -> None:
    """Release this process's pages of `array` when it is a view of a memory mapping (no effect
    otherwise, or where the system cannot): the next read takes them from the file again."""
    mapping = _mapping(array) if isinstance(array, np.ndarray) else None
    if mapping is None or not array.flags.c_contiguous or array.size == 0:
        return
    start = array.ctypes.data - np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    first = start // _PAGE * _PAGE
    end = -(-(start + array.nbytes) // _PAGE) * _PAGE
    try:
        mapping.madvise(mmap.MADV_DONTNEED, first, min(end, len(mapping)) - first)
    except (AttributeError, OSError, ValueError):
        pass
