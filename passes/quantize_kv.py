"""quantize_kv: a decoder's KV cache stored as int8, calibrated, quantized and read inside attention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import progress_bar
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec, empty_cache_as
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["QuantizeKV"]

_ATTENTION = "GroupQueryAttention"
_K_SCALE = 12  # GroupQueryAttention's k_scale input; v_scale follows it
_QMAX = 127


@register_pass
@dataclass(frozen=True)
class QuantizeKV(Pass):
    """Store a decoder's KV cache as int8 codes with a scale per (KV head, channel).

    Reads calibration feeds (`ctx.calib`): the float graph runs them and their present keys and
    values give each channel's range. A key is cached after rotary, which turns channel i and its
    rotary partner together, so both get the largest length of the pair (a bound no position's
    rotation can exceed); a value channel gets its largest magnitude. Each range times `headroom`
    maps to 127. Past and present become int8 (clip(round(x / scale), -128, 127)), and the decoder
    spec's cache_dtype "int8" (the host's buffers follow it). Rewrites, per form:
    - ort: every GroupQueryAttention gets k_scale / v_scale inputs [1, kv_heads, 1, head_dim],
      k_quant_type / v_quant_type PER_CHANNEL and kv_cache_bit_width 8; onnxruntime rounds the new
      rows into the cache and reads the codes back.
    - portable: standard ops. Each past input is read through DequantizeLinear; each layer's new
      rows go out through QuantizeLinear as the present output, and the attention reads them
      through DequantizeLinear too (blocked Q/DQ along the sequence axis, one block: a scale per
      head and channel).
    Either way every read, in a prefill chunk or a decode step, sees the same codes, so a prompt gives
    the same logits in one chunk or token by token. The cache takes a quarter of float32's memory.
    Does NOT fire on a decoder whose cache is already int8 (`changed` False). Refused: a model that
    is not a decoder, an ort-form attention that is not GroupQueryAttention over the spec's
    past/present, a cache tensor that is not a float32 graph input / output.
    """

    name: ClassVar[str] = "quantize_kv"
    mutates_input: ClassVar[bool] = True

    headroom: float = field(default=1.0, metadata={
        "help": "range of a channel = its calibrated range times this (>= 1: room for values the calibration never saw)"})

    def check(self) -> None:
        if not 1.0 <= self.headroom <= 16.0:
            raise OptionError(f"'quantize_kv': option 'headroom' must be in [1, 16], got {self.headroom}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        spec = DecoderSpec.of(model)
        if spec is None:
            raise UnsupportedGraphError(f"'quantize_kv': '{model.name}' is not a decoder (no decoder spec); build one "
                                        "with a recipe's decoder: section")
        if spec.cache_dtype == "int8":
            return PassResult(model, False, {"cache_dtype": "int8"})
        layers = _attention_layers(model, spec) if spec.form == "ort" else None
        _check_cache_tensors(model, spec)
        feeds = ctx.require_calib("quantize_kv")
        pairs = [_rotary_pairs(node, spec.head_dim) for node in layers] if layers else [_llama_pairs(spec.head_dim)] * spec.layers
        k_range, v_range = _ranges(model, spec, pairs, feeds, ctx.progress)
        scales = [(_scale(k_range[i], self.headroom, spec), _scale(v_range[i], self.headroom, spec))
                  for i in range(spec.layers)]
        if layers:
            for node, (k_scale, v_scale) in zip(layers, scales):
                _quantize_attention_cache(node, k_scale, v_scale)
        else:
            _quantize_graph_cache(model, spec, scales)
        _set_cache_dtype(model, spec)
        stats = {"layers": spec.layers, "form": spec.form, "cache_dtype": "int8", "calibration_feeds": len(feeds),
                 "headroom": self.headroom, "cache_bytes_per_token": 2 * spec.layers * spec.kv_heads * spec.head_dim}
        return PassResult(model, True, stats)


def _attention_layers(model: Model, spec: DecoderSpec) -> list[gs.Node]:
    """The GroupQueryAttention of each layer, in layer order: the node reading past_key_values.N.key/value
    and writing present.N.key/value."""
    by_past = {}
    for node in model.graph.nodes:
        if node.op == _ATTENTION and node.domain == "com.microsoft" and len(node.inputs) > 4:
            by_past[node.inputs[3].name] = node
    layers = []
    for n in range(spec.layers):
        node = by_past.get(f"past_key_values.{n}.key")
        wanted = ([f"past_key_values.{n}.key", f"past_key_values.{n}.value"], [f"present.{n}.key", f"present.{n}.value"])
        if node is None or [t.name for t in node.inputs[3:5]] != wanted[0] or [t.name for t in node.outputs[1:3]] != wanted[1]:
            raise UnsupportedGraphError(f"'quantize_kv': '{model.name}': layer {n}'s cache is not read and written by "
                                        f"one {_ATTENTION} ({wanted[0][0]} -> {wanted[1][0]})")
        if len(node.inputs) > _K_SCALE and any(not t.is_empty() for t in node.inputs[_K_SCALE:]):
            raise UnsupportedGraphError(f"'quantize_kv': {_ATTENTION} '{node.name}' has k_scale / v_scale inputs already")
        layers.append(node)
    return layers


def _check_cache_tensors(model: Model, spec: DecoderSpec) -> None:
    """Every past input and present output is a float32 tensor of the graph's signature."""
    tensors = {t.name: t for t in model.graph.inputs + model.graph.outputs}
    for name in spec.past_names + spec.present_names:
        tensor = tensors.get(name)
        if tensor is None or np.dtype(tensor.dtype) != np.float32:
            raise UnsupportedGraphError(f"'quantize_kv': '{model.name}': cache tensor '{name}' is not a float32 "
                                        "input or output of the graph")


def _quantize_attention_cache(node: gs.Node, k_scale: np.ndarray, v_scale: np.ndarray) -> None:
    """GroupQueryAttention `node` keeps its cache as int8 codes of these scales."""
    while len(node.inputs) > _K_SCALE:
        node.inputs.pop()
    while len(node.inputs) < _K_SCALE:
        node.inputs.append(gs.Variable.empty())
    node.inputs.append(gs.Constant(f"{node.outputs[1].name}.scale", k_scale))
    node.inputs.append(gs.Constant(f"{node.outputs[2].name}.scale", v_scale))
    node.attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)


def _quantize_graph_cache(model: Model, spec: DecoderSpec, scales: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The portable form: past inputs read through DequantizeLinear, new rows written through
    QuantizeLinear (the present outputs) and read back through DequantizeLinear."""
    graph = model.graph
    tensors = graph.tensors()
    block = {"axis": 2, "block_size": spec.capacity}  # one block along the sequence: a scale per head and channel
    for i, pair in enumerate(scales):
        for kind, scale in zip(("key", "value"), pair):
            scale_c = gs.Constant(f"present.{i}.{kind}.scale", scale)
            zero = gs.Constant(f"present.{i}.{kind}.zero_point", np.zeros_like(scale, dtype=np.int8))
            past = tensors[f"past_key_values.{i}.{kind}"]
            read = gs.Variable(f"{past.name}.dequantized", np.float32, past.shape)
            _reroute(past, read)
            graph.nodes.append(gs.Node("DequantizeLinear", f"{past.name}/DequantizeLinear", attrs=dict(block),
                                       inputs=[past, scale_c, zero], outputs=[read]))
            rows = tensors[f"present.{i}.{kind}"]
            codes = gs.Variable(rows.name, np.int8, rows.shape)
            rows.name = f"{codes.name}.rows"
            seen = gs.Variable(f"{codes.name}.dequantized", np.float32, rows.shape)
            _reroute(rows, seen)
            graph.nodes += [gs.Node("QuantizeLinear", f"{codes.name}/QuantizeLinear", attrs=dict(block),
                                    inputs=[rows, scale_c, zero], outputs=[codes]),
                            gs.Node("DequantizeLinear", f"{codes.name}/DequantizeLinear", attrs=dict(block),
                                    inputs=[codes, scale_c, zero], outputs=[seen])]
            graph.outputs = [codes if t is rows else t for t in graph.outputs]
    graph.toposort()


def _reroute(tensor: gs.Variable, replacement: gs.Variable) -> None:
    """Every node reading `tensor` reads `replacement` instead."""
    for consumer in list(tensor.outputs):
        for j, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[j] = replacement


def _ranges(model: Model, spec: DecoderSpec, pairs: list[np.ndarray | None], feeds, progress: bool):
    """Per layer, the [kv_heads, head_dim] ranges of the present keys (rotary pairs' lengths) and values
    (magnitudes) over every calibration feed."""
    names = [n.name for n in model.graph.outputs]
    at = {name: names.index(name) for name in spec.present_names}
    k_range = np.zeros((spec.layers, spec.kv_heads, spec.head_dim))
    v_range = np.zeros_like(k_range)
    run = model.runner()
    for feed in progress_bar(feeds, len(feeds), "quantize_kv: calibrating", progress):
        outputs = run(feed)
        for i in range(spec.layers):
            k = outputs[at[f"present.{i}.key"]].astype(np.float64)  # [batch, kv_heads, tokens, head_dim]
            v = outputs[at[f"present.{i}.value"]]
            if k.shape[2] == 0:
                continue
            if pairs[i] is not None:
                k = np.sqrt(k ** 2 + k[..., pairs[i]] ** 2)
            k_range[i] = np.maximum(k_range[i], np.abs(k).max(axis=(0, 2)))
            v_range[i] = np.maximum(v_range[i], np.abs(v).max(axis=(0, 2)))
    if not k_range.any():
        raise UnsupportedGraphError(f"'quantize_kv': the calibration feeds of '{model.name}' put no token in the cache")
    return k_range, v_range


def _rotary_pairs(node: gs.Node, head_dim: int) -> np.ndarray | None:
    """Channel -> the channel GroupQueryAttention's rotary turns it with (None when it applies none)."""
    if not node.attrs.get("do_rotary", 0):
        return None
    if node.attrs.get("rotary_interleaved", 0):
        return np.arange(head_dim) ^ 1
    return _llama_pairs(head_dim)


def _llama_pairs(head_dim: int) -> np.ndarray:
    """Channel -> its partner in Llama's rotary (rotate_half: i and i + head_dim / 2), which the
    portable form computes in the graph before the key is cached."""
    return (np.arange(head_dim) + head_dim // 2) % head_dim


def _scale(ranges: np.ndarray, headroom: float, spec: DecoderSpec) -> np.ndarray:
    """[1, kv_heads, 1, head_dim] scales mapping each range to 127 (a channel the calibration never saw
    move gets the smallest of the others', not 0)."""
    seen = ranges[ranges > 0]
    floor = seen.min() if seen.size else 1.0
    return (np.maximum(ranges, floor) * headroom / _QMAX).astype(np.float32).reshape(1, spec.kv_heads, 1, spec.head_dim)


def _set_cache_dtype(model: Model, spec: DecoderSpec) -> None:
    """Make past/present int8 in the graph, the signature, the spec and the sample inputs (prefills
    from an empty cache, whose cache entries become int8 zeros)."""
    names = set(spec.past_names) | set(spec.present_names)
    for tensor in model.graph.inputs + model.graph.outputs:
        if tensor.name in names:
            tensor.dtype = np.int8
    model.inputs, model.outputs = ([dataclasses.replace(t, dtype="int8") if t.name in names else t for t in specs]
                                   for specs in (model.inputs, model.outputs))
    quantized = dataclasses.replace(spec, cache_dtype="int8")
    model.sample_inputs = [empty_cache_as(quantized, feeds) for feeds in model.sample_inputs]
    model.meta.extra["decoder"] = quantized.to_json()
