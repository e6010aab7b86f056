"""The IR handle: one `Model` holding an FX GraphModule or an onnx-graphsurgeon graph, plus metadata."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.errors import GraphoptError, UnsupportedGraphError
from graphopt.files import mapping
from graphopt.files.json_files import jsonable
from graphopt.ir import onnx_files
from graphopt.ir.meta import ENCODINGS_IN_GRAPH, META_KEY, PROVENANCE_KEY, ModelMeta
from graphopt.ir.onnx_files import EXTERNAL_THRESHOLD
from graphopt.ir.runtime import IN_MEMORY, NUMPY_TO_ONNX, ort_session
from graphopt.quant.encodings import Encodings

__all__ = ["TensorSpec", "ModelMeta", "Model", "Form", "MIN_OPSET", "is_parameter_dtype", "synthesized_feeds"]

Form = Literal["fx", "onnx"]
MIN_OPSET = 21  # int4 / uint16 QDQ and blocked quantization need opset 21


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype name, and shape (str entries are dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _np_dtype_name(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


class Model:
    """One model in exactly one IR form.

    - FX form: `model.fx` is a `torch.fx.GraphModule` from `torch.export.export(...).module()`.
    - ONNX form: `model.graph` is an `onnx_graphsurgeon.Graph` (opset >= 21 after lowering).

    `inputs`/`outputs` describe the signature; `sample_inputs` are feeds (name -> numpy array)
    the pass manager uses for verification; `task` tells metrics what the first output means
    ("causal-lm": logits over a vocabulary, "embedding": one vector per input, "generic").
    """

    def __init__(
        self,
        *,
        fx=None,
        graph: gs.Graph | None = None,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        sample_inputs: list[dict[str, np.ndarray]] | None = None,
        meta: ModelMeta | None = None,
        task: str = "generic",
        name: str = "model",
        source: Path | None = None,
        ir_version: int | None = None,
        tokenizer=None,
    ):
        if (fx is None) == (graph is None):
            raise GraphoptError("a Model holds exactly one form: pass either fx= or graph=")
        self.fx = fx
        self.graph = graph
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.sample_inputs = list(sample_inputs or [])
        self.meta = meta or ModelMeta()
        self.task = task
        self.name = name
        self.source = Path(source) if source else None
        self.ir_version = ir_version
        self.tokenizer = tokenizer

    # ----------------------------------------------------------------- form
    @property
    def form(self) -> Form:
        return "fx" if self.fx is not None else "onnx"

    def require(self, form: Form, who: str) -> None:
        """Raise a clear error if `who` (a pass or backend) gets the wrong form."""
        if self.form != form:
            raise UnsupportedGraphError(f"{who} needs the {form.upper()} form, got {self.form.upper()}")

    def replace(self, **changes) -> "Model":
        """A new Model sharing everything but `changes` (the graph itself is not copied)."""
        fields = dict(
            fx=self.fx, graph=self.graph, inputs=self.inputs, outputs=self.outputs,
            sample_inputs=self.sample_inputs, meta=self.meta, task=self.task, name=self.name,
            source=self.source, ir_version=self.ir_version, tokenizer=self.tokenizer,
        )
        if "fx" in changes:
            fields["graph"] = None
        if "graph" in changes:
            fields["fx"] = None
        fields.update(changes)
        return Model(**fields)

    def copy(self) -> "Model":
        """A copy of graph structure and metadata; weight arrays are shared, not copied.

        Copying SmolLM2's 540 MB of weights per pass would dominate a pipeline, so weights are
        copy-on-write by contract: a pass assigns a new array (`const.values = new`), never
        writes into an existing one. Sample inputs and tokenizer are shared (read-only) too.
        """
        if self.form == "fx":
            body = {"fx": copy.deepcopy(self.fx)}
        else:
            body = {"graph": self.graph.copy()}
        return self.replace(meta=copy.deepcopy(self.meta), **body)

    # ----------------------------------------------------------- ONNX form
    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, *, weights: dict[str, np.ndarray] | None = None, **kwargs) -> "Model":
        """The ONNX form of `proto`. `weights` gives the values of initializers the message keeps
        external (memory-mapped by `onnx_files.load_onnx_mapped`); they are used as they are."""
        graph = gs.import_onnx(proto)
        if weights:
            tensors = graph.tensors()
            for name, array in weights.items():
                tensors[name].values = array
        meta = ModelMeta()
        for prop in proto.metadata_props:
            if prop.key == META_KEY:
                data = json.loads(prop.value)
                meta = ModelMeta.from_json(data)
                if data.get(ENCODINGS_IN_GRAPH):
                    restored = Encodings.from_qdq_graph(graph, set(data[ENCODINGS_IN_GRAPH])).to_meta()
                    meta.encodings = {**restored, **meta.encodings}
        # to_onnx stores provenance on the nodes; read it back so a saved model still says who made what
        for node in proto.graph.node:
            made_by = next((p.value for p in node.metadata_props if p.key == PROVENANCE_KEY), None)
            if made_by and node.name:
                meta.provenance.setdefault(node.name, made_by)
        inputs = [_spec_of(v) for v in proto.graph.input if v.name not in {i.name for i in proto.graph.initializer}]
        outputs = [_spec_of(v) for v in proto.graph.output]
        kwargs.setdefault("meta", meta)
        return cls(graph=graph, inputs=inputs, outputs=outputs, ir_version=proto.ir_version, **kwargs)

    def to_onnx(self, *, externals: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """Serialise the ONNX form to a ModelProto, with metadata and node provenance attached.

        With `externals` (a dict this fills), every constant of a numpy type of at least
        EXTERNAL_THRESHOLD bytes stays out of the message: it is an external reference to
        "graphopt-in-memory" and its array goes into `externals` by name, uncopied. Sessions
        (`runtime.ort_session(proto, externals=...)`) and writers (`onnx_files.write_onnx`) take both.
        """
        self.require("onnx", "to_onnx")
        _pack_4bit_constants(self.graph)
        with _external_constants(self.graph, externals):
            proto = gs.export_onnx(self.graph, do_type_check=False)
        if self.ir_version:
            proto.ir_version = max(proto.ir_version, self.ir_version)
        meta = {k: v for k, v in self.meta.to_json().items() if k != "provenance"}
        # a pre-quantized weight's encoding is its DequantizeLinear already; written again as JSON,
        # per-block scales alone made a W4 SmolLM2 file 43 MB (50 %) larger. from_onnx restores them.
        in_graph = sorted(_dequantized_constants(self.graph) & set(meta["encodings"]))
        if in_graph:
            meta["encodings"] = {n: e for n, e in meta["encodings"].items() if n not in in_graph}
            meta[ENCODINGS_IN_GRAPH] = in_graph
        del proto.metadata_props[:]
        proto.metadata_props.add(key=META_KEY, value=json.dumps(jsonable(meta)))
        for node in proto.graph.node:
            made_by = self.meta.provenance.get(node.name)
            if made_by:
                node.metadata_props.add(key=PROVENANCE_KEY, value=made_by)
        return proto

    def write(self, target: str | Path) -> list[Path]:
        """Serialise the ONNX form to `target`, a fresh path (e.g. inside an `OutputSet`'s staging
        folder), weights streamed to `target.name + ".data"` when large; the files written."""
        externals: dict[str, np.ndarray] = {}
        proto = self.to_onnx(externals=externals)
        return onnx_files.write_onnx(proto, Path(target), externals)

    def save(self, path: str | Path) -> Path:
        """Write the ONNX form atomically (external data beside it when large, streamed from the
        weights without a second copy in memory); never over the source."""
        inputs = [self.source] if self.source else []
        externals: dict[str, np.ndarray] = {}
        proto = self.to_onnx(externals=externals)
        return onnx_files.save_onnx(proto, path, inputs=inputs, externals=externals)

    # ------------------------------------------------------------ running
    def session(self, threads: int = 0, **options):
        """An onnxruntime session for the ONNX form (`threads` 0: one per core); the weights reach
        onnxruntime as the arrays the graph holds, uncopied. `options` go to `runtime.ort_session`."""
        externals: dict[str, np.ndarray] = {}
        proto = self.to_onnx(externals=externals)
        return ort_session(proto, threads=threads, consume=True, externals=externals, **options)

    def run(self, feeds: dict[str, np.ndarray], session=None) -> list[np.ndarray]:
        """Run one batch: torch for the FX form, onnxruntime for the ONNX form; outputs as numpy."""
        if self.form == "fx":
            import torch

            args = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name])) for spec in self.inputs]
            with torch.no_grad():
                out = self.fx(*args)
            if not isinstance(out, (tuple, list)):
                out = [out]
            return [o.detach().float().numpy() if o.is_floating_point() else o.numpy() for o in out]
        session = session or self.session()
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {n: feeds[n] for n in names})

    def runner(self, threads: int = 0):
        """A callable `feeds -> outputs` that reuses one onnxruntime session across calls."""
        session = self.session(threads) if self.form == "onnx" else None
        return lambda feeds: self.run(feeds, session=session)

    # ------------------------------------------------------------ sizes
    def parameters(self) -> dict[str, tuple[tuple[int, ...], str, int]]:
        """name -> (shape, dtype, bytes) for every weight (FX parameters/buffers, ONNX constants)."""
        out = {}
        if self.form == "fx":
            for name, t in list(self.fx.named_parameters()) + list(self.fx.named_buffers()):
                out[name] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), t.numel() * t.element_size())
            return out
        for name, tensor in self.graph.tensors().items():
            if isinstance(tensor, gs.Constant):  # shape and type only: a lazy or mapped weight is not read
                out[name] = (tuple(tensor.shape), _dtype_name(tensor), _nbytes(tensor))
        return out

    def num_nodes(self) -> int:
        if self.form == "fx":
            return sum(1 for n in self.fx.graph.nodes if n.op == "call_function")
        return len(self.graph.nodes)

    def num_params(self) -> int:
        """Weight values; shape and index constants (int64, bool) are not parameters."""
        return sum(int(np.prod(shape)) for shape, dtype, _ in self.parameters().values()
                   if is_parameter_dtype(dtype))

    def num_bytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.parameters().values())

    def __repr__(self) -> str:
        return f"Model({self.name!r}, form={self.form}, nodes={self.num_nodes()}, task={self.task})"


def synthesized_feeds(specs: list[TensorSpec], *, dynamic_dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch for inputs described by `specs`: dynamic dims of `dynamic_dim`, floats from a
    seeded normal, integers and booleans zero (a valid token id or index), masks one."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else dynamic_dim for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:  # a mask of zeros would hide every position; other integers are ids or indices
            feeds[spec.name] = (np.ones if "mask" in spec.name.lower() else np.zeros)(shape, dtype=dtype)
    return feeds


def is_parameter_dtype(dtype: str) -> bool:
    """Whether a constant of this dtype counts as a parameter; int64/bool constants are shapes,
    indices and masks that folding creates or removes without changing the model's size in weights."""
    return dtype not in ("int64", "bool")


def _dtype_name(tensor: gs.Constant) -> str:
    dtype = tensor.dtype
    if isinstance(dtype, np.dtype) or isinstance(dtype, type):
        return np.dtype(dtype).name
    return str(dtype)


def _nbytes(tensor: gs.Constant) -> int:
    """Bytes on disk: 4-bit types pack two values per byte."""
    export_dtype = getattr(tensor, "export_dtype", None)
    # onnx >= 1.20 holds int4 as ml_dtypes arrays, one byte per value in memory
    if export_dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or _dtype_name(tensor) in ("int4", "uint4"):
        return (int(np.prod(tensor.shape)) + 1) // 2
    return int(tensor._values.nbytes)  # LazyValues and arrays both know their size without loading


def _dequantized_constants(graph: gs.Graph) -> set[str]:
    """Names of DequantizeLinear outputs whose codes are a constant (pre-quantized weights)."""
    return {n.outputs[0].name for n in graph.nodes
            if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)}


def _pack_4bit_constants(graph: gs.Graph) -> None:
    """Reading a Constant's values turns its lazy proto into an ml_dtypes int4/uint4 array, which
    onnx-graphsurgeon would export one byte per value (onnx refuses it); hand it the packed proto."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, np.ndarray) and values.dtype.name in ("int4", "uint4"):
            tensor._values = LazyValues(onnx.numpy_helper.from_array(values, tensor.name))


@contextlib.contextmanager
def _external_constants(graph: gs.Graph, externals: dict[str, np.ndarray] | None):
    """While exporting: large constants of a numpy type appear as external references (to
    "graphopt-in-memory", or to their own file when memory-mapped; the arrays collected in
    `externals`), so the message holds no copy."""
    if externals is None:
        yield
        return
    from onnx_graphsurgeon.ir.tensor import LazyValues

    swapped = []
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if not isinstance(values, np.ndarray) or values.nbytes < EXTERNAL_THRESHOLD:
            continue
        elem = NUMPY_TO_ONNX.get(values.dtype.name)
        if elem is None:
            continue
        stub = onnx.TensorProto(name=tensor.name, dims=values.shape, data_type=elem,
                                data_location=onnx.TensorProto.EXTERNAL)
        mapped = mapping.source(values)  # a weight still in its file: name the file, so a runtime reads it there
        entries = (("location", mapped[0].name), ("offset", str(mapped[1])), ("length", str(values.nbytes))) \
            if mapped else (("location", IN_MEMORY),)
        for key, value in entries:
            stub.external_data.add(key=key, value=value)
        externals[tensor.name] = values
        swapped.append((tensor, values))
        tensor._values = LazyValues(stub)
    try:
        yield
    finally:
        for tensor, values in swapped:
            tensor._values = values


def _spec_of(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in ttype.shape.dim)
    return TensorSpec(value.name, _np_dtype_name(ttype.elem_type), dims)
