"""ONNX files: loading with external data kept inside the model's folder, saving atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import ModelLoadError
from graphopt.files.mapping import drop_pages
from graphopt.files.onnx_reading import (
    check_graph,
    check_tensors,
    check_text,
    densify_sparse,
    map_external,
    read_external,
    tensor_sites,
)
from graphopt.files.reading import check_file, shown
from graphopt.files.writing import OutputSet
from graphopt.ir.meta import check_meta

__all__ = ["PROTOBUF_LIMIT", "tensor_bytes", "check_external_data", "load_onnx", "load_onnx_mapped", "save_onnx",
           "write_onnx"]

# Protobuf cannot serialise a message of 2 GiB or more; larger models keep weights beside them.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes; initializers smaller than this stay inline
# element types numpy holds natively (sub-byte and ml_dtypes types stay inside the message)
NUMPY_NATIVE = {getattr(onnx.TensorProto, t) for t in (
    "FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL")}


def check_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Check every tensor of `model` and its external data (location, size) without reading any."""
    check_tensors(model, Path(model_path))




def load_onnx(path: str | os.PathLike, *, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file through the reading boundary (`graphopt.files.onnx_reading`).

    In order, before any external byte is read: the file parses; its names are UTF-8; the graph is well formed (no
    tensor made twice, no input nothing makes, no output nothing makes, no cycle; in subgraphs and
    functions too); its `graphopt.meta` metadata is valid; every tensor's bytes match its shape
    and every external reference stays inside the model's folder within its file. Then the
    external data is read (when `load_weights`) and sparse tensors are made dense. Any failure is
    a ModelLoadError (UnsafePathError for locations) naming the file and the tensor or node.
    """
    path = Path(path)
    check_file(path, max_bytes=PROTOBUF_LIMIT, error=ModelLoadError, what="ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelLoadError(f"{path}: not a readable ONNX model (corrupt or truncated?): "
                             f"{type(exc).__name__}: {shown(str(exc), 200)}") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: the file parsed to an empty graph (corrupt or truncated?)")
    check_text(model, path)
    check_graph(model, path)
    check_meta(model, path)
    ranges = check_tensors(model, path)
    if load_weights:
        read_external(ranges, path)
        densify_sparse(model, path)
    return model


def load_onnx_mapped(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`load_onnx`, with the main graph's external initializers memory-mapped instead of read:
    (the message, whose mapped tensors stay external; name -> read-only array). A 2.7 GB model
    then costs its pages as they are touched, once, instead of a copy in the message and another
    in numpy. `Model.from_onnx(proto, weights=arrays)` takes both."""
    path = Path(path)
    model = load_onnx(path, load_weights=False)
    ranges = check_tensors(model, path)
    mapped = map_external(ranges, path, {t.name for t in model.graph.initializer})
    densify_sparse(model, path)
    return model, mapped


def referenced_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file names (initializers, Constant attributes, subgraphs,
    functions, sparse initializers), resolved against its folder; [] when it cannot be parsed
    (the loader reports that). For writers: none of these may be replaced."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure: the loader names it when the model is read
        return []
    found = []
    for tensor in _all_tensor_protos(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if tensor.data_location == onnx.TensorProto.EXTERNAL and location:
            found.append((path.parent / location).resolve())
    return sorted(set(found))


def _all_tensor_protos(proto: onnx.ModelProto):
    """Every TensorProto of a model: initializers and attribute tensors of the graph, its subgraphs and
    its functions, and the values and indices of sparse initializers."""
    return (tensor for _, tensor in tensor_sites(proto))


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, inputs: list[Path] = (),
              externals: dict[str, np.ndarray] | None = None) -> Path:
    """Write `model` to `path` as one output set; weights go to `<name>.data` beside it when large.

    Both files are staged and renamed into place together (`graphopt.files.writing.OutputSet`), so a
    crash leaves either the old files or the new ones; neither may replace one of `inputs`. An
    earlier `<name>.data` that the new model does not need is left where it is: nothing here removes
    a file it did not write.
    """
    path = Path(path)
    with OutputSet(path.parent, inputs=inputs, force=True, manifest=False) as out:
        write_onnx(model, out.path(path.name), externals)
    return path


def write_onnx(model: onnx.ModelProto, target: Path, externals: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Serialise `model` to `target` (a fresh path); returns the files written. `model` is unchanged.

    `externals` holds the arrays of tensors the message references as in-memory external data
    (`Model.to_onnx(externals=...)`). A model whose weights fit one protobuf comfortably is written
    as one file; a larger one keeps every weight of EXTERNAL_THRESHOLD bytes or more in
    `target.name + ".data"` beside it, streamed from the arrays one at a time (no second copy of
    the weights in memory), each at an offset aligned to 4096 bytes so runtimes can map it.
    """
    externals = externals or {}
    if tensor_bytes(model) + sum(a.nbytes for a in externals.values()) <= PROTOBUF_LIMIT // 4:
        if externals:
            model = _with_raw_data(model, externals)
        onnx.save_model(model, str(target))
        return [target]
    data = target.parent / (target.name + ".data")
    light = onnx.ModelProto()
    light.CopyFrom(model)
    with open(data, "wb") as fh:
        for tensor in light.graph.initializer:
            array = externals.get(tensor.name) if tensor.data_location == onnx.TensorProto.EXTERNAL else None
            raw = None if array is not None else (tensor.raw_data if len(tensor.raw_data) >= EXTERNAL_THRESHOLD else None)
            if array is None and raw is None:
                continue
            offset = -fh.tell() % 4096
            fh.write(b"\0" * offset)
            offset = fh.tell()
            if array is not None:
                _write_array(fh, array)
            else:
                fh.write(raw)
            length = fh.tell() - offset
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
    onnx.save_model(light, str(target))
    return [target, data]


def _write_array(fh, array: np.ndarray, chunk: int = 64 << 20) -> None:
    """Write `array`'s bytes (C order) in chunks: a memory-mapped weight is read once, not copied."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, chunk):
        fh.write(memoryview(flat[start:start + chunk]))
        drop_pages(flat[start:start + chunk])  # a mapped weight's pages, once written, need not stay


def _with_raw_data(model: onnx.ModelProto, externals: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose in-memory external tensors hold their bytes (for a small model)."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    for tensor in full.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in externals:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = np.ascontiguousarray(externals[tensor.name]).tobytes()
    return full


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the message (initializers and Constant nodes of the main graph).

    What decides whether a model fits one protobuf, without ByteSize(), which walks the whole
    message (2 s for SmolLM2, paid on every session)."""
    tensors = list(model.graph.initializer) + [
        a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.HasField("t")]
    return sum(len(t.raw_data) or t.ByteSize() for t in tensors)


