"""What the ONNX loader checks before it trusts a model: every tensor, its external data, the graph.

- `tensor_sites` walks every TensorProto a model holds, with where it sits: initializers, sparse
  initializers (values and indices), attribute tensors (Constant `value`, any node's tensor
  attributes) of the main graph, of every If/Loop/Scan body, and of every function.
- `check_tensors` checks each one's element type, dims and byte count against its shape (raw
  bytes, typed fields or external data), and each external reference's location (relative, no
  `..`, inside the folder with symlinks followed, a regular file with one hard link) and byte
  range (inside the file) BEFORE anything is read; a file whose tensors claim far more bytes than
  it has on disk (a sparse file) is refused rather than read as zeros.
- `read_external` then reads exactly the checked ranges (`map_external` maps the large ones instead); `densify_sparse` turns sparse
  initializers and Constant `sparse_value`s into dense tensors (their dense size bounded).
- `check_text` refuses string fields that are not UTF-8 (names, op types, metadata).
- `check_graph` refuses graphs no runtime accepts: a tensor made twice, a node input nothing
  makes, a graph output nothing makes or listed twice, a cycle; for subgraphs and functions too.

Every failure is a ModelLoadError (UnsafePathError for locations) naming the file and the tensor
or node.
"""

from __future__ import annotations

import math
import os
import stat
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.errors import ModelLoadError, UnsafePathError
from graphopt.files.mapping import register
from graphopt.files.reading import confined_path, shown

__all__ = ["tensor_sites", "check_tensors", "read_external", "map_external", "densify_sparse", "check_text",
           "check_graph", "ExternalRange"]

T = TensorProto
_BITS = {T.FLOAT: 32, T.UINT8: 8, T.INT8: 8, T.UINT16: 16, T.INT16: 16, T.INT32: 32, T.INT64: 64, T.STRING: 0,
         T.BOOL: 8, T.FLOAT16: 16, T.DOUBLE: 64, T.UINT32: 32, T.UINT64: 64, T.COMPLEX64: 64, T.COMPLEX128: 128,
         T.BFLOAT16: 16, T.FLOAT8E4M3FN: 8, T.FLOAT8E4M3FNUZ: 8, T.FLOAT8E5M2: 8, T.FLOAT8E5M2FNUZ: 8, T.UINT4: 4,
         T.INT4: 4}
for _name, _bits in (("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6),
                     ("FLOAT6E3M2", 6)):
    if hasattr(T, _name):  # newer onnx releases
        _BITS[getattr(T, _name)] = _bits
_EXTERNAL_KEYS = {"location", "offset", "length", "checksum", "basepath"}
MAX_DENSE_BYTES = 1 << 30  # a sparse tensor densified at load; past this it is refused
SPARSE_FILE_MIN = 64 << 20  # files claiming more than this must have at least 1/8 of it on disk
MAX_SUBGRAPH_DEPTH = 16


# -------------------------------------------------------------------------------- walking
def tensor_sites(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(where, tensor) for every TensorProto of `model`; `where` reads like "initializer 'W'" or
    "node 'if0' attribute 'then_branch': initializer 'c'"."""
    yield from _graph_sites(model.graph, "")
    for function in model.functions:
        for node in function.node:
            yield from _node_sites(node, f"function '{function.name}': ")


def _graph_sites(graph: onnx.GraphProto, prefix: str) -> Iterator[tuple[str, TensorProto]]:
    for tensor in graph.initializer:
        yield f"{prefix}initializer '{tensor.name}'", tensor
    for sparse in graph.sparse_initializer:
        yield f"{prefix}sparse initializer '{sparse.values.name}' values", sparse.values
        yield f"{prefix}sparse initializer '{sparse.values.name}' indices", sparse.indices
    for node in graph.node:
        yield from _node_sites(node, prefix)


def _node_sites(node: onnx.NodeProto, prefix: str) -> Iterator[tuple[str, TensorProto]]:
    for attr in node.attribute:
        here = f"{prefix}node '{node.name or node.op_type}' attribute '{attr.name}'"
        if attr.HasField("t"):
            yield here, attr.t
        for i, tensor in enumerate(attr.tensors):
            yield f"{here}[{i}]", tensor
        sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
        for sp in sparse:
            yield f"{here} values", sp.values
            yield f"{here} indices", sp.indices
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_sites(graph, f"{here}: ")


# ------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class ExternalRange:
    """Where one tensor's bytes lie: a checked file, an offset and a length."""

    tensor: TensorProto
    where: str
    file: Path
    offset: int
    length: int


def _element_count(tensor: TensorProto, where: str, path: Path) -> int:
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{path}: {where} has a negative dimension in {list(tensor.dims)}")
    return math.prod(tensor.dims)


def _expected_bytes(tensor: TensorProto, count: int, where: str, path: Path) -> int:
    bits = _BITS[tensor.data_type]
    if bits == 0:
        raise ModelLoadError(f"{path}: {where}: a string tensor keeps its values in string_data, not raw bytes")
    return (count * bits + 7) // 8


def _typed_count(tensor: TensorProto, count: int) -> tuple[str, int]:
    """(field, entries it must hold) for a tensor stored in ONNX's typed fields."""
    kind, bits = tensor.data_type, _BITS[tensor.data_type]
    field = onnx.helper.tensor_dtype_to_field(kind)
    if kind in (T.COMPLEX64, T.COMPLEX128):
        return field, 2 * count
    if bits in (2, 4):  # 2- and 4-bit codes are stored packed, one byte per int32 entry (6-bit: one code each)
        return field, (count * bits + 7) // 8
    return field, count


def check_tensors(model: onnx.ModelProto, path: Path) -> list[ExternalRange]:
    """Check every tensor of `model` (see the module docstring) without reading external data;
    returns the external byte ranges to read."""
    folder = path.resolve().parent
    ranges: list[ExternalRange] = []
    for where, tensor in tensor_sites(model):
        count = _element_count(tensor, where, path)
        if tensor.data_type not in _BITS:
            raise ModelLoadError(f"{path}: {where} has unknown element type {tensor.data_type}")
        if tensor.data_location == T.EXTERNAL:
            ranges.append(_external_range(tensor, where, count, folder, path))
        elif tensor.HasField("raw_data"):
            expected = _expected_bytes(tensor, count, where, path)
            if len(tensor.raw_data) != expected:
                raise ModelLoadError(f"{path}: {where} holds {len(tensor.raw_data):,} bytes, its shape "
                                     f"{list(tensor.dims)} needs {expected:,} (file truncated or corrupt)")
        else:
            field, expected = _typed_count(tensor, count)
            held = len(getattr(tensor, field))
            if held != expected:
                raise ModelLoadError(f"{path}: {where} holds {held:,} values in {field}, its shape "
                                     f"{list(tensor.dims)} needs {expected:,} (file truncated or corrupt)")
    _refuse_sparse_files(ranges, path)
    return ranges


def _external_range(tensor: TensorProto, where: str, count: int, folder: Path, path: Path) -> ExternalRange:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _EXTERNAL_KEYS:
            raise ModelLoadError(f"{path}: {where}: unknown external-data key {shown(entry.key)}")
        if entry.key in entries:
            raise ModelLoadError(f"{path}: {where}: external-data key '{entry.key}' is given twice")
        entries[entry.key] = entry.value
    if tensor.data_type == T.STRING:
        raise ModelLoadError(f"{path}: {where}: a string tensor cannot keep its values in external data")
    who = f"{path}: {where}: external data"
    file = confined_path(folder, entries.get("location", ""), who=who, error=UnsafePathError, missing=ModelLoadError,
                         label="the model's folder")
    info = file.stat()
    if info.st_nlink > 1:
        raise UnsafePathError(f"{who} '{entries['location']}' has {info.st_nlink} hard links; a file linked from "
                              "elsewhere may be any file on the disk, so graphopt refuses it (copy it instead)")
    offset = _digits(entries.get("offset", "0"), f"{who} offset", path)
    expected = _expected_bytes(tensor, count, where, path)
    if "length" in entries and _digits(entries["length"], f"{who} length", path) != expected:
        raise ModelLoadError(f"{who}: length {entries['length']} bytes, its shape {list(tensor.dims)} needs "
                             f"{expected:,}")
    if offset + expected > info.st_size:
        raise ModelLoadError(f"{who} '{entries['location']}': bytes {offset:,}..{offset + expected:,} lie past "
                             f"its end ({info.st_size:,} bytes; truncated?)")
    return ExternalRange(tensor, where, file, offset, expected)


def _digits(value: str, what: str, path: Path) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise ModelLoadError(f"{path}: {what} must be a non-negative integer, got {shown(value)}")
    return int(value)


def _refuse_sparse_files(ranges: list[ExternalRange], path: Path) -> None:
    """A file whose tensors claim more bytes than it holds on disk is mostly holes: reading it
    would allocate the claimed size for zeros. Refused once the claim passes SPARSE_FILE_MIN."""
    claimed: dict[Path, int] = defaultdict(int)
    for r in ranges:
        claimed[r.file] += r.length
    for file, total in claimed.items():
        on_disk = file.stat().st_blocks * 512
        if total > SPARSE_FILE_MIN and on_disk < total // 8:
            raise ModelLoadError(f"{path}: external data '{file.name}' has {on_disk:,} bytes on disk for the "
                                 f"{total:,} its tensors claim (a sparse file); refusing to read holes as weights")


def read_external(ranges: list[ExternalRange], path: Path) -> None:
    """Read every checked range into its tensor (raw_data), each file opened once without following
    a symlink swapped in since the check."""
    by_file: dict[Path, list[ExternalRange]] = defaultdict(list)
    for r in ranges:
        by_file[r.file].append(r)
    for file, items in by_file.items():
        fd = _open_checked(file, path)
        try:
            for r in items:
                data = os.pread(fd, r.length, r.offset)
                if len(data) != r.length:
                    raise ModelLoadError(f"{path}: {r.where}: external data '{file.name}' ended early "
                                         f"({len(data):,} of {r.length:,} bytes)")
                r.tensor.raw_data = data
                r.tensor.data_location = T.DEFAULT
                del r.tensor.external_data[:]
        finally:
            os.close(fd)


def map_external(ranges: list[ExternalRange], path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Memory-map the checked ranges of the tensors named in `names` (those of a numpy dtype) read-only
    instead of reading them: their pages are read when first touched, the file is never written
    through them, and the tensors stay external in the message. Returns name -> array; every other
    range is read into its tensor as `read_external` does. Each file is opened once, without
    following a symlink swapped in since the check."""
    import mmap

    mapped: dict[str, np.ndarray] = {}
    by_file: dict[Path, list[ExternalRange]] = defaultdict(list)
    rest = []
    for r in ranges:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(r.tensor.data_type) if r.tensor.data_type in _MAPPABLE else None
        (by_file[r.file] if r.tensor.name in names and dtype is not None else rest).append(r)
    for file, items in by_file.items():
        fd = _open_checked(file, path)
        try:
            view = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: external data '{file.name}' cannot be mapped: {exc}") from None
        finally:
            os.close(fd)
        for r in items:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(r.tensor.data_type))
            if r.offset + r.length > len(view):
                raise ModelLoadError(f"{path}: {r.where}: external data '{file.name}' ended early")
            array = np.frombuffer(view, dtype=dtype, count=r.length // dtype.itemsize, offset=r.offset)
            mapped[r.tensor.name] = register(array.reshape(tuple(r.tensor.dims)), file, r.offset)
    read_external(rest, path)
    return mapped


_MAPPABLE = {T.FLOAT, T.FLOAT16, T.DOUBLE, T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64,
             T.BOOL}


def _open_checked(file: Path, path: Path) -> int:
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ModelLoadError(f"{path}: external data '{file.name}' cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise UnsafePathError(f"{path}: external data '{file.name}' changed while loading")
    return fd


# -------------------------------------------------------------------------------- sparse
def densify_sparse(model: onnx.ModelProto, path: Path) -> None:
    """Sparse initializers become dense initializers and Constant `sparse_value`s dense `value`s
    (onnx-graphsurgeon reads sparse initializers as zeros); indices are checked first: in range,
    ascending, no repeats, and the dense size at most MAX_DENSE_BYTES."""
    graphs = [(model.graph, "")]
    graphs += [(g, f"function '{f.name}': ") for f in model.functions for g in _node_graphs(f.node)]
    seen = 0
    while seen < len(graphs):
        graph, prefix = graphs[seen]
        seen += 1
        graphs += [(g, prefix) for g in _node_graphs(graph.node)]
        if graph.sparse_initializer:
            dense = [_dense(sp, f"{prefix}sparse initializer '{sp.values.name}'", path) for sp in graph.sparse_initializer]
            del graph.sparse_initializer[:]
            graph.initializer.extend(dense)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
                        where = f"{prefix}node '{node.name or node.op_type}' sparse_value"
                        tensor = _dense(attr.sparse_tensor, where, path)
                        attr.Clear()
                        attr.CopyFrom(onnx.helper.make_attribute("value", tensor))


def _node_graphs(nodes) -> list[onnx.GraphProto]:
    return [g for n in nodes for a in n.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _dense(sparse: onnx.SparseTensorProto, where: str, path: Path) -> TensorProto:
    from onnx import numpy_helper

    dims = list(sparse.dims)
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices) if sparse.indices.dims else np.zeros((0,), np.int64)
    if not dims or any(d < 0 for d in dims):
        raise ModelLoadError(f"{path}: {where}: dense shape {dims} is not a tensor shape")
    size = math.prod(dims)
    if size * values.dtype.itemsize > MAX_DENSE_BYTES:
        raise ModelLoadError(f"{path}: {where}: its dense form {dims} would take {size * values.dtype.itemsize:,} "
                             f"bytes, more than {MAX_DENSE_BYTES:,}")
    if values.ndim != 1 or sparse.indices.data_type != T.INT64:
        raise ModelLoadError(f"{path}: {where}: values must be 1-D and indices int64")
    if indices.ndim == 2 and indices.shape == (values.size, len(dims)):
        if np.any(indices < 0) or np.any(indices >= np.array(dims)):
            raise ModelLoadError(f"{path}: {where}: an index lies outside the shape {dims}")
        indices = np.ravel_multi_index(indices.T, dims) if values.size else indices.reshape(-1)
    elif indices.shape != (values.size,):
        raise ModelLoadError(f"{path}: {where}: {values.size} values need indices of shape [{values.size}] or "
                             f"[{values.size}, {len(dims)}], got {list(indices.shape)}")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ModelLoadError(f"{path}: {where}: an index lies outside the {size:,} elements of {dims}")
    if indices.size > 1 and np.any(np.diff(indices) <= 0):
        raise ModelLoadError(f"{path}: {where}: indices must ascend without repeats")
    dense = np.zeros(size, dtype=values.dtype)
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(dims), sparse.values.name)


# ---------------------------------------------------------------------------------- text
def check_text(model: onnx.ModelProto, path: Path) -> None:
    """Every string field (names, op types, domains, metadata) must be UTF-8: protobuf hands invalid
    bytes back as `bytes`, which the graph tools downstream fail on far from the file."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            values = value if repeated else [value]
            if field.type == FieldDescriptor.TYPE_STRING:
                for text in values:
                    if isinstance(text, bytes):
                        raise ModelLoadError(f"{path}: a {field.containing_type.name}.{field.name} is not UTF-8 "
                                             f"text ({shown(text)})")
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(values)


# --------------------------------------------------------------------------------- graph
def check_graph(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a graph no runtime accepts (see the module docstring), naming the node or tensor."""
    initializers = {t.name for t in model.graph.initializer}
    signature = [("input", v) for v in model.graph.input if v.name not in initializers]
    for kind, value in signature + [("output", v) for v in model.graph.output]:
        ttype = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if ttype is None or ttype.elem_type not in _BITS:
            raise ModelLoadError(f"{path}: graph {kind} '{value.name}' is not a tensor of a known element type "
                                 f"({'no type' if ttype is None else f'element type {ttype.elem_type}'})")
    _check_scope(model.graph, [i.name for i in model.graph.input], set(), f"{path}: ", path, 0)
    for function in model.functions:
        _check_scope(function, list(function.input), set(), f"{path}: function '{function.name}': ", path, 0,
                     outputs=list(function.output))


def _check_scope(graph, inputs: list[str], outer: set[str], where: str, path: Path, depth: int,
                 outputs: list[str] | None = None) -> set[str]:
    """Check one graph (or function body); returns the names it reads from enclosing graphs."""
    made: dict[str, str] = {}
    for name in inputs:
        if name in made:
            raise ModelLoadError(f"{where}graph input '{name}' is listed twice")
        made[name] = "a graph input"
    initializers = [t.name for t in getattr(graph, "initializer", [])]
    initializers += [s.values.name for s in getattr(graph, "sparse_initializer", [])]
    for name in initializers:
        if made.get(name, "a graph input") != "a graph input":
            raise ModelLoadError(f"{where}initializer '{name}' is given twice")
        made[name] = "an initializer"
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        label = f"node '{node.name or node.op_type}'"
        for name in node.output:
            if not name:
                continue
            if name in made:
                raise ModelLoadError(f"{where}{label} makes tensor '{name}', which {made[name]} already makes")
            made[name], producer[name] = label, index
    free: set[str] = set()
    needs: list[set[int]] = []
    for node in graph.node:
        label = f"node '{node.name or node.op_type}'"
        _check_attributes(node, f"{where}{label}")
        reads = {name for name in node.input if name}
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                if depth >= MAX_SUBGRAPH_DEPTH:
                    raise ModelLoadError(f"{where}{label}: subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep")
                visible = outer | set(made)
                reads |= _check_scope(sub, [i.name for i in sub.input], visible,
                                      f"{where}{label} attribute '{attr.name}': ", path, depth + 1)
        for name in reads:
            if name not in made and name not in outer:
                raise ModelLoadError(f"{where}{label} reads '{name}', which no node, graph input or initializer makes")
        free |= {name for name in reads if name not in made}
        needs.append({producer[name] for name in reads if name in producer})
    _check_acyclic(graph, needs, where)
    listed = outputs if outputs is not None else [o.name for o in graph.output]
    seen: set[str] = set()
    for name in listed:
        if name in seen:
            raise ModelLoadError(f"{where}graph output '{name}' is listed twice")
        seen.add(name)
        if name not in made and name not in outer:
            raise ModelLoadError(f"{where}graph output '{name}' is made by no node, input or initializer")
        if name not in made:
            free.add(name)
    return free


_A = onnx.AttributeProto
_ATTRIBUTE_FIELD = {_A.FLOAT: "f", _A.INT: "i", _A.STRING: "s", _A.TENSOR: "t", _A.GRAPH: "g",
                    _A.SPARSE_TENSOR: "sparse_tensor", _A.TYPE_PROTO: "tp", _A.FLOATS: None, _A.INTS: None,
                    _A.STRINGS: None, _A.TENSORS: None, _A.GRAPHS: None, _A.SPARSE_TENSORS: None, _A.TYPE_PROTOS: None}


def _check_attributes(node: onnx.NodeProto, where: str) -> None:
    """Each attribute has a known type and holds its value in that type's field (a function body
    may instead refer to the function's own attribute)."""
    for attr in node.attribute:
        if attr.ref_attr_name:
            continue
        if attr.type not in _ATTRIBUTE_FIELD:
            raise ModelLoadError(f"{where}: attribute '{attr.name}' has unknown type {attr.type}")
        field = _ATTRIBUTE_FIELD[attr.type]
        if field is not None and not attr.HasField(field):
            raise ModelLoadError(f"{where}: attribute '{attr.name}' of type "
                                 f"{_A.AttributeType.Name(attr.type)} holds no value")


def _check_acyclic(graph, needs: list[set[int]], where: str) -> None:
    """Kahn's algorithm; a node left over sits on (or behind) a cycle."""
    waiting = [len(n) for n in needs]
    users: dict[int, list[int]] = defaultdict(list)
    for index, deps in enumerate(needs):
        for dep in deps:
            users[dep].append(index)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    done = 0
    while ready:
        index = ready.popleft()
        done += 1
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done != len(needs):
        stuck = next(i for i, w in enumerate(waiting) if w)
        node = graph.node[stuck]
        raise ModelLoadError(f"{where}node '{node.name or node.op_type}' depends on its own output (the graph has "
                             "a cycle)")
