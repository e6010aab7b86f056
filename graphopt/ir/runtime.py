"""onnxruntime sessions for in-memory models, weights handed over without a copy."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.errors import UnsupportedGraphError
from graphopt.files import mapping
from graphopt.ir.onnx_files import EXTERNAL_THRESHOLD, NUMPY_NATIVE

__all__ = ["ort_session"]


IN_MEMORY = "graphopt-in-memory"  # the location of a tensor whose bytes are handed to onnxruntime as an array
NUMPY_TO_ONNX = {np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).name: t for t in NUMPY_NATIVE}


def ort_session(model: onnx.ModelProto, *, providers=("CPUExecutionProvider",), threads: int = 0,
                optimization: str = "all", consume: bool = False, config: dict[str, str] | None = None,
                externals: dict[str, np.ndarray] | None = None,
                low_memory: bool = False):
    """An onnxruntime session for an in-memory model.

    The weights reach onnxruntime as external initializers (numpy views of the message's bytes),
    so only the graph is serialised: a SmolLM2 session starts in 2.5 s instead of 6.7 s, and a
    model past protobuf's 2 GB limit needs no temporary file. `model` is left as it came, unless
    `consume` (a message made for this session only): then its weights are not copied back.
    `optimization` "basic" keeps QDQ semantics (no fused integer kernels); "none" runs the graph as is.
    `config`: session config entries, e.g. {"session.qdq_matmulnbits_accuracy_level": "1"} (at
    onnxruntime's default, 4, a DQ -> MatMul it fuses into MatMulNBits quantizes its float or
    16-bit activation to int8 on the fly). `externals`: arrays of tensors `model` references as
    IN_MEMORY external data (`Model.to_onnx(externals=...)`), handed over uncopied. `low_memory`
    turns off weight prepacking (a packed copy of every MatMul weight): for verification runs of
    large models, not for timing.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in {**({"session.disable_prepacking": "1"} if low_memory else {}), **(config or {})}.items():
        options.add_session_config_entry(key, str(value))
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    values = []
    try:
        for tensor in model.graph.initializer:
            if tensor.data_type not in NUMPY_NATIVE or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_THRESHOLD:
                continue
            array = np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            values.append(ort.OrtValue.ortvalue_from_numpy(array.reshape(tuple(tensor.dims))))
            moved.append((tensor, raw))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=IN_MEMORY)
        in_files = _read_from_their_files(model, externals or {}, options)
        given = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                 for n, a in (externals or {}).items() if n not in in_files}
        values += list(given.values())
        if values:
            options.add_external_initializers([t.name for t, _ in moved] + list(given), values)
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeError types
            text = " ".join(str(exc).split())
            raise UnsupportedGraphError(
                f"onnxruntime cannot run the model '{model.graph.name}': {text[:600]}") from exc
    finally:
        for tensor, raw in ([] if consume else moved):
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            tensor.raw_data = raw
    session.graphopt_weights = values  # onnxruntime reads these buffers for the session's lifetime
    return session


def _read_from_their_files(model: onnx.ModelProto, externals: dict[str, np.ndarray], options) -> set[str]:
    """Names of `externals` onnxruntime reads from the file they are mapped from (one folder: the
    first mapped array's), instead of being handed a copy; the others are marked IN_MEMORY."""
    folder, found = None, set()
    tensors = {t.name: t for t in model.graph.initializer}
    for name, array in externals.items():
        mapped = mapping.source(array)
        if mapped is not None and folder in (None, mapped[0].parent) and name in tensors:
            folder = mapped[0].parent
            found.add(name)
        elif name in tensors:
            del tensors[name].external_data[:]
            tensors[name].external_data.add(key="location", value=IN_MEMORY)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return found
