"""ONNX files: loading with external data kept inside the model's folder, saving atomically."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import ModelLoadError, UnsafePathError
from graphopt.files.writing import OutputSet

__all__ = ["PROTOBUF_LIMIT", "tensor_bytes", "check_external_data", "load_onnx", "save_onnx", "write_onnx"]

# Protobuf cannot serialise a message of 2 GiB or more; larger models keep weights beside them.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes; initializers smaller than this stay inline
# element types numpy holds natively (sub-byte and ml_dtypes types stay inside the message)
NUMPY_NATIVE = {getattr(onnx.TensorProto, t) for t in (
    "FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL")}


def _external_locations(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Map each external-data location to the tensors that reference it."""
    locations: dict[str, list[str]] = {}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        locations.setdefault(entry.get("location", ""), []).append(tensor.name)
    return locations


def check_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Refuse external-data locations that leave the model's folder or do not exist.

    A location must be relative, must not climb with `..`, and must resolve (symlinks followed)
    to a file inside the folder that holds the model.
    """
    folder = model_path.resolve().parent
    for location, tensors in _external_locations(model).items():
        example = tensors[0]
        if not location:
            raise ModelLoadError(f"{model_path}: tensor '{example}' is external but names no location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise UnsafePathError(
                f"{model_path}: tensor '{example}' points its external data at '{location}', which "
                "leaves the model's folder; graphopt only reads external data stored beside the model"
            )
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise UnsafePathError(
                f"{model_path}: external data '{location}' of tensor '{example}' resolves to "
                f"'{target}', outside the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{model_path}: external data file '{location}' (tensor '{example}') is missing"
            )


def load_onnx(path: str | os.PathLike, *, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, with its external data, after checking that the data stays in its folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: the file parsed to an empty graph (corrupt or truncated?)")
    check_external_data(model, path)
    if load_weights:
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: external data could not be read: {exc}") from exc
        _check_tensor_sizes(model, path)
    return model


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """A truncated file can still parse; tensors whose bytes do not match their shape betray it."""
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        count = 1
        for dim in tensor.dims:
            count *= dim
        expected = count * itemsize
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            expected = (count + 1) // 2
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(
                f"{path}: initializer '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape "
                f"{list(tensor.dims)} needs {expected} (file truncated or corrupt)"
            )


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
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(proto)
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        graphs += [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
        graphs += [g for n in graph.node for a in n.attribute for g in a.graphs]


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, inputs: list[Path] = ()) -> Path:
    """Write `model` to `path` as one output set; weights go to `<name>.data` beside it when large.

    Both files are staged and renamed into place together (`graphopt.files.writing.OutputSet`), so a
    crash leaves either the old files or the new ones; neither may replace one of `inputs`. An
    earlier `<name>.data` that the new model does not need is left where it is: nothing here removes
    a file it did not write.
    """
    path = Path(path)
    with OutputSet(path.parent, inputs=inputs, force=True, manifest=False) as out:
        write_onnx(model, out.path(path.name))
    return path


def write_onnx(model: onnx.ModelProto, target: Path) -> list[Path]:
    """Serialise `model` to `target` (a fresh path), weights in `target.name + ".data"` beside it
    when the model is too large for one protobuf; returns the files written. `model` is unchanged."""
    data_name = target.name + ".data"
    if tensor_bytes(model) <= PROTOBUF_LIMIT // 4:
        onnx.save_model(model, str(target))
        return [target]
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=EXTERNAL_THRESHOLD)
    # save_model converted the tensors in place; bring the weights back into memory
    onnx.load_external_data_for_model(model, str(target.parent))
    return [target, target.parent / data_name]


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the message (initializers and Constant nodes of the main graph).

    What decides whether a model fits one protobuf, without ByteSize(), which walks the whole
    message (2 s for SmolLM2, paid on every session)."""
    tensors = list(model.graph.initializer) + [
        a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.HasField("t")]
    return sum(len(t.raw_data) or t.ByteSize() for t in tensors)


