"""Lowering FX -> ONNX with the dynamo exporter, cached on disk by content hash.

Decoders (models with a `graphopt.ir.decoder.DecoderSpec`) lower the same way: their attention op
becomes onnxruntime's GroupQueryAttention (`graphopt.lowering.attention`), their cache inputs and
outputs keep their names, and `graphopt.lowering.decoder` makes the graphs a decoder is saved as.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import MIN_OPSET, Model
from graphopt.ir.decoder import DecoderSpec, example_feeds
from graphopt.ir.onnx_files import load_onnx, save_onnx

__all__ = ["lower", "cache_dir", "content_hash"]

_LOWERING_VERSION = "2"  # bump when the exporter call below changes what it produces


def cache_dir() -> Path:
    """Where exports are cached: $GRAPHOPT_CACHE, else ~/.cache/graphopt."""
    root = os.environ.get("GRAPHOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    return Path(root)


def content_hash(model: Model, opset: int) -> str:
    """A digest of everything the export depends on: code, weights, signature, versions."""
    import torch

    digest = hashlib.sha256()
    for part in (_LOWERING_VERSION, torch.__version__, onnx.__version__, str(opset), model.fx.code,
                 *_decoder_parts(model)):
        digest.update(part.encode())
    for spec in model.inputs + model.outputs:
        digest.update(repr(spec).encode())
    state = dict(model.fx.named_parameters())
    state.update(dict(model.fx.named_buffers()))
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:32]


def _decoder_parts(model: Model) -> list[str]:
    """What a decoder's export depends on beyond its code: its spec and the attention translation."""
    spec = model.meta.extra.get("decoder")
    if spec is None:
        return []
    from graphopt.lowering.attention import LOWERING_VERSION

    return [json.dumps(spec, sort_keys=True), LOWERING_VERSION]


def _dynamic_shapes(model: Model):
    """One {axis: DYNAMIC} per input, in order (the FX module takes its inputs positionally)."""
    import torch

    return tuple({axis: torch.export.Dim.DYNAMIC for axis, size in enumerate(spec.shape) if isinstance(size, str)}
                 for spec in model.inputs)


def _example_args(model: Model):
    """Inputs to export with: a decoder's example feeds (no axis of size 0 or 1, which the exporter
    would fix), else the first sample input."""
    import torch

    spec = DecoderSpec.of(model)
    if spec is not None:
        feeds = example_feeds(spec)
    elif model.sample_inputs:
        feeds = model.sample_inputs[0]
    else:
        raise GraphoptError(f"cannot lower '{model.name}': it has no sample inputs to trace with")
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[spec.name])) for spec in model.inputs)


def _translation_table(model: Model) -> dict | None:
    """The exporter's translations of graphopt's own ops, when the FX graph holds one."""
    from graphopt.ir.attention import ATTENTION_OP

    if not any(node.op == "call_function" and node.target is ATTENTION_OP for node in model.fx.graph.nodes):
        return None
    from graphopt.lowering.attention import translation_table

    return translation_table()


def lower(model: Model, *, opset: int = MIN_OPSET, use_cache: bool = True, log=print) -> Model:
    """FX form -> ONNX form. Tensor and parameter names stay those of the FX module.

    The exported file is cached under `cache_dir()/exports/<hash>/model.onnx`, so lowering the
    same weights and code again only loads the file.
    """
    import torch

    model.require("fx", "lower")
    if opset < MIN_OPSET:
        raise GraphoptError(f"lowering needs opset >= {MIN_OPSET}, got {opset}")
    key = content_hash(model, opset)
    target = cache_dir() / "exports" / key / "model.onnx"
    if use_cache and target.is_file():
        log(f"lower: cached export {target}")
        proto = load_onnx(target)
    else:
        start = time.perf_counter()
        log(f"lower: exporting '{model.name}' to ONNX opset {opset} (dynamo)...")
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.fx,
                _example_args(model),
                dynamic_shapes=_dynamic_shapes(model),
                input_names=[s.name for s in model.inputs],
                opset_version=opset,
                dynamo=True,
                optimize=False,
                verbose=False,
                custom_translation_table=_translation_table(model),
            )
            proto = _fold_weight_transposes(program.model_proto)
            proto = _optimize(proto)
            _name_outputs(proto, [s.name for s in model.outputs])
            _name_dynamic_axes(proto, model)
        log(f"lower: exported in {time.perf_counter() - start:.1f} s")
        if use_cache:
            save_onnx(proto, target)
            proto = load_onnx(target)
    lowered = Model.from_onnx(  # its own metadata: a pass writing into it must not change the FX model's
        proto, sample_inputs=model.sample_inputs, meta=copy.deepcopy(model.meta), task=model.task,
        name=model.name, tokenizer=model.tokenizer,
    )
    # The exporter may widen names of dynamic axes; keep the signature the user gave.
    lowered.inputs = list(model.inputs)
    return lowered


def _fold_weight_transposes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold `Transpose(weight)` into the weight itself, keeping the parameter's name.

    The exporter writes Linear as MatMul(x, Transpose(W)); its optimizer would fold the transpose
    into an anonymous `val_N`, and encodings and masks keyed by parameter name would lose their
    tensor. The folded [in, out] weight keeps the name `W` when the transpose was its only use,
    and is called `W.T` when the original is still needed. A tied embedding (W also read by
    Gather along axis 0) is stored once: the Gathers read `W.T` along axis 1 and transpose their
    result, so the phone does not carry the vocabulary table twice.
    """
    from collections import Counter

    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    renames: dict[str, str] = {}
    kept_nodes = []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        source = node.input[0] if node.op_type == "Transpose" and node.input else None
        if source not in inits or numpy_helper.to_array(inits[source]).ndim != 2 or perm not in (None, [1, 0]):
            kept_nodes.append(node)
            continue
        folded = numpy_helper.to_array(inits[source]).T.copy()
        name = source if uses[source] == 1 else f"{source}.T"
        tensor = numpy_helper.from_array(folded, name)
        if name == source:
            inits[source].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
        renames[node.output[0]] = name
    del graph.node[:]
    graph.node.extend(_share_tied_tables(kept_nodes, renames, inits, graph))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    stale = [v for v in graph.value_info if v.name in renames]
    for value in stale:
        graph.value_info.remove(value)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    return proto


def _share_tied_tables(nodes, renames, inits, graph):
    """Point axis-0 Gathers of a weight that now has a transposed copy at that copy instead."""
    transposed = {src: name for name in renames.values() if name.endswith(".T") for src in [name[:-2]]}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.input) + list(graph.value_info)}
    out = []
    for node in nodes:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        rank = ranks.get(node.input[1]) if table in transposed else None
        if table not in transposed or axis != 0 or not rank:
            out.append(node)
            continue
        gathered = f"{node.output[0]}__columns"
        out.append(onnx.helper.make_node(
            "Gather", [transposed[table], node.input[1]], [gathered], name=node.name, axis=1))
        out.append(onnx.helper.make_node(
            "Transpose", [gathered], [node.output[0]], name=f"{node.name}__to_rows",
            perm=list(range(1, rank + 1)) + [0]))
    return out


def _name_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Give graph outputs the model's output names, moving aside any inner value already so named.

    (Passing output_names to the exporter fails when a traced op has the same name, e.g. BERT's
    `embedding` op and a model output called `embedding`.)
    """
    graph = proto.graph
    mapping: dict[str, str] = {}
    current = [o.name for o in graph.output]
    taken = {v for node in graph.node for v in list(node.input) + list(node.output)}
    for old, new in zip(current, names):
        if old == new:
            continue
        if new in taken and new not in current:
            mapping[new] = f"{new}__inner"
        mapping[old] = new
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in list(graph.output) + list(graph.value_info):
        value.name = mapping.get(value.name, value.name)


def _name_dynamic_axes(proto: onnx.ModelProto, model: Model) -> None:
    """Replace the exporter's symbols (s72, s70) by the axis names of the model's inputs."""
    symbols: dict[str, str] = {}
    specs = {spec.name: spec for spec in model.inputs}
    for value in proto.graph.input:
        spec = specs.get(value.name)
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape if spec else ()):
            if isinstance(size, str) and dim.dim_param:
                symbols[dim.dim_param] = size
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = symbols[dim.dim_param]


def _optimize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer: constant folding and common-subexpression clean-up."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(proto)


class _quiet_exporter:
    """Silence the exporter's INFO/WARNING chatter (e.g. missing torchvision ops)."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
