"""The graphs a decoder is saved and run as, sharing one set of weights.

A decoder Model in the ONNX form holds one graph. `DecoderGraphs.of(model)` makes what runs it:
- ort form: that graph, `model.onnx` (dynamic sequence and past lengths);
- portable form: two static graphs specialised from it, `prefill.onnx` (S = the prefill chunk)
  and `decode.onnx` (S = 1). Specialising fixes the input and output shapes and folds the shape
  arithmetic that S fed; it never touches a weight, so both graphs hold the same initializers
  (the same quantization codes and scales: one set of encodings).

Large initializers are taken out of the graphs once (`weights`): written to disk they are one
data file both graphs reference (`write`), and in memory the sessions of both graphs read the
same arrays (`sessions`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import onnx

from graphopt.errors import GraphoptError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec
from graphopt.ir.onnx_files import EXTERNAL_THRESHOLD, NUMPY_NATIVE
from graphopt.ir.runtime import ort_session

__all__ = ["DecoderGraphs", "specialise", "graph_files", "IN_MEMORY"]

IN_MEMORY = "graphopt-in-memory"  # location of weights held by DecoderGraphs, not yet in a file
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


def _split_weights(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Move every initializer of EXTERNAL_THRESHOLD bytes or more out of `proto` (left as a
    reference to IN_MEMORY with its type and dims); returns name -> the tensor with its bytes."""
    from onnx import numpy_helper

    weights = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise GraphoptError(f"initializer '{tensor.name}' still refers to an external file; load its data first")
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) < EXTERNAL_THRESHOLD:
            continue
        kept = onnx.TensorProto()
        kept.CopyFrom(tensor)
        weights[tensor.name] = kept
        tensor.ClearField("raw_data")
        _external(tensor, IN_MEMORY)
    return weights


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
    """A decoder's graphs (file name -> graph without its large weights) and those weights, shared."""

    spec: DecoderSpec
    graphs: dict[str, onnx.ModelProto]
    weights: dict[str, onnx.TensorProto]

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
        proto = model.to_onnx()
        weights = _split_weights(proto)
        graphs = {name: proto if seq is None else specialise(proto, spec, seq)
                  for name, seq in graph_files(spec).items()}
        return cls(spec, graphs, weights)

    def sessions(self, threads: int = 0, *, optimization: str = "all") -> dict[str, object]:
        """One onnxruntime session per graph; the weights numpy holds are read by all of them from
        one copy (4-bit weights, which numpy cannot hold, are copied into each graph)."""
        import onnxruntime as ort
        from onnx import numpy_helper

        shared = {name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t))
                  for name, t in self.weights.items() if t.data_type in NUMPY_NATIVE}
        sessions = {}
        for file, graph in self.graphs.items():
            proto = copy.deepcopy(graph)
            for tensor in proto.graph.initializer:
                if tensor.name in self.weights and tensor.name not in shared:
                    tensor.CopyFrom(self.weights[tensor.name])
            names = [t.name for t in proto.graph.initializer if t.name in shared]
            sessions[file] = ort_session(proto, threads=threads, optimization=optimization, consume=True,
                                         shared={n: shared[n] for n in names})
        return sessions

    def write(self, folder: Path) -> list[Path]:
        """Write the graphs and one weights file into `folder` (a staging folder: see OutputSet);
        returns the files written."""
        data_name = weights_file(self.spec)
        offsets: dict[str, tuple[int, int]] = {}
        written = []
        if self.weights:
            with open(folder / data_name, "wb") as fh:
                for name, tensor in self.weights.items():
                    raw = tensor.raw_data
                    align = _ALIGN_LARGE if len(raw) >= 1 << 20 else _ALIGN
                    fh.write(b"\0" * (-fh.tell() % align))
                    offsets[name] = (fh.tell(), len(raw))
                    fh.write(raw)
            written.append(folder / data_name)
        for file, graph in self.graphs.items():
            proto = copy.deepcopy(graph)
            for tensor in proto.graph.initializer:
                if tensor.name in offsets:
                    _external(tensor, data_name, *offsets[tensor.name])
            onnx.save_model(proto, str(folder / file))
            written.append(folder / file)
        return written
