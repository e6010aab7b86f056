"""The graphs a decoder is saved and run as, sharing one set of weights.

A decoder Model in the ONNX form holds one graph. `DecoderGraphs.of(model)` makes what runs it:
- ort form: that graph, `model.onnx` (dynamic sequence and past lengths);
- portable form: two static graphs specialised from it, `prefill.onnx` (S = the prefill chunk)
  and `decode.onnx` (S = 1). Specialising fixes the input and output shapes and folds the shape
  arithmetic that S fed; it never touches a weight, so both graphs hold the same initializers
  (the same quantization codes and scales: one set of encodings).

Large initializers live outside the graphs, once (`weights`, and `packed` for 4-bit ones numpy
cannot hold): written to disk they are one data file both graphs reference (`write`); in memory
the sessions of both graphs read the same arrays, or onnxruntime reads them from the file they
are mapped from (`sessions`, see `graphopt.ir.runtime.ort_session`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec
from graphopt.ir.onnx_files import EXTERNAL_THRESHOLD, NUMPY_NATIVE
from graphopt.ir.runtime import IN_MEMORY, ort_session

__all__ = ["DecoderGraphs", "specialise", "graph_files", "weights_file"]

_FOLD_LIMIT = 1024  # elements: folding makes shapes and indices, never weight-sized tensors
_ALIGN_LARGE, _ALIGN = 4096, 64  # offsets of tensors >= 1 MiB sit on page boundaries (ORT can map them)


def graph_files(spec: DecoderSpec) -> dict[str, int | None]:
    """File name -> the sequence length its graph is fixed to (None: dynamic), and the weights file."""
    if spec.form == "ort":
        return {"model.onnx": None}
    return {"prefill.onnx": spec.prefill_chunk, "decode.onnx": 1}


def weights_file(spec: DecoderSpec) -> str:
    """The data file the graphs' weights live in: ORT's usual name beside model.onnx, else one
    neutral name for the graphs that share it."""
    return "model.onnx.data" if spec.form == "ort" else "weights.data"


def _external(tensor: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    if offset is not None:
        tensor.external_data.add(key="offset", value=str(offset))
        tensor.external_data.add(key="length", value=str(length))


def _move_inline(proto: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Take the initializers of EXTERNAL_THRESHOLD bytes or more that `Model.to_onnx` left in the
    message (not yet read, or 4-bit codes) out of it, as IN_MEMORY references: those of a numpy
    type into `weights`; returns the others, name -> bytes."""
    packed = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
            continue
        if tensor.data_type in NUMPY_NATIVE:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            weights[tensor.name] = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
        else:
            packed[tensor.name] = tensor.raw_data
        tensor.ClearField("raw_data")
        _external(tensor, IN_MEMORY)
    return packed


def specialise(proto: onnx.ModelProto, spec: DecoderSpec, seq: int) -> onnx.ModelProto:
    """A copy of the portable decoder graph `proto` (its weights moved out) with every input and
    output shape fixed for `seq` new tokens, and the shape arithmetic folded into constants.

    The initializers are unchanged: the same names, types and values (only small constants the
    folding makes are added). Refused: a graph whose inputs or outputs are not the spec's.
    """
    import onnx_ir
    import onnxscript.optimizer

    proto = copy.deepcopy(proto)
    graph = proto.graph
    inputs, outputs = spec.input_shapes(seq), spec.output_shapes(seq)
    for values, shapes in ((graph.input, inputs), (graph.output, outputs)):
        names = [v.name for v in values if v.name in shapes]
        if names != list(shapes):
            raise UnsupportedGraphError(f"decoder graph: expected {'inputs' if shapes is inputs else 'outputs'} "
                                        f"{list(shapes)[:4]}..., found {names[:4]}...")
        for value in values:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = size
    del graph.value_info[:]
    before = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    # constant folding and dead-node removal only: the full optimizer would read (and merge) weights
    model = onnx_ir.from_proto(proto)
    onnxscript.optimizer.fold_constants(model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    folded = onnx_ir.to_proto(model)
    after = {t.name for t in folded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    if before != after:
        raise UnsupportedGraphError(f"decoder graph: specialising to {seq} tokens changed its weights "
                                    f"({sorted(before ^ after)[:3]})")
    return folded


@dataclass
class DecoderGraphs:
    """A decoder's graphs (file name -> graph whose large initializers are external references) and
    those initializers, held once for all graphs: `weights` (numpy arrays, possibly mapped from a
    file) and `packed` (4-bit codes, as bytes)."""

    spec: DecoderSpec
    graphs: dict[str, onnx.ModelProto]
    weights: dict[str, np.ndarray]
    packed: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Model, *, log=print) -> "DecoderGraphs":
        """The graphs of a decoder Model (an FX-form model is lowered first)."""
        spec = DecoderSpec.of(model)
        if spec is None:
            raise UnsupportedGraphError(f"'{model.name}' is not a decoder (no decoder spec in its metadata); build "
                                        "one with graphopt.load(source, decoder=...)")
        if model.form == "fx":
            from graphopt.lowering import lower

            model = lower(model, log=log)
        weights: dict[str, np.ndarray] = {}
        proto = model.to_onnx(externals=weights)
        packed = _move_inline(proto, weights)
        graphs = {name: proto if seq is None else specialise(proto, spec, seq)
                  for name, seq in graph_files(spec).items()}
        return cls(spec, graphs, weights, packed)

    def _inlined(self, file: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """A copy of graph `file` with its 4-bit codes inside, and the weight arrays it references."""
        proto = copy.deepcopy(self.graphs[file])
        for tensor in proto.graph.initializer:
            if tensor.name in self.packed:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = self.packed[tensor.name]
        names = {t.name for t in proto.graph.initializer} & set(self.weights)
        return proto, {n: self.weights[n] for n in names}

    def sessions(self, threads: int = 0, *, config: dict[str, str] | None = None) -> dict[str, object]:
        """One onnxruntime session per graph, all reading the same weight arrays (4-bit codes are
        copied into each graph); `config`: session config entries."""
        sessions = {}
        for file in self.graphs:
            proto, externals = self._inlined(file)
            sessions[file] = ort_session(proto, threads=threads, consume=True, config=config, externals=externals)
        return sessions

    def model(self, file: str, name: str | None = None) -> Model:
        """Graph `file` as a Model of the ONNX form holding the shared weight arrays (uncopied): what a
        backend emits and checks per graph."""
        proto, externals = self._inlined(file)
        return Model.from_onnx(proto, weights=externals, name=name or Path(file).stem)

    def write(self, folder: Path) -> list[Path]:
        """Write the graphs and one weights file into `folder` (a staging folder: see OutputSet),
        each weight once at an aligned offset; returns the files written."""
        data_name = weights_file(self.spec)
        offsets: dict[str, tuple[int, int]] = {}
        written = []
        blobs = {**{n: np.ascontiguousarray(a).reshape(-1).view(np.uint8) for n, a in self.weights.items()},
                 **{n: np.frombuffer(b, np.uint8) for n, b in self.packed.items()}}
        if blobs:
            with open(folder / data_name, "wb") as fh:
                for name, raw in blobs.items():
                    fh.write(b"\0" * (-fh.tell() % (_ALIGN_LARGE if raw.size >= 1 << 20 else _ALIGN)))
                    offsets[name] = (fh.tell(), raw.size)
                    fh.write(memoryview(raw))
            written.append(folder / data_name)
        for file, graph in self.graphs.items():
            proto = copy.deepcopy(graph)
            for tensor in proto.graph.initializer:
                if tensor.name in offsets:
                    _external(tensor, data_name, *offsets[tensor.name])
            onnx.save_model(proto, str(folder / file))
            written.append(folder / file)
        return written
