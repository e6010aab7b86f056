"""Decoders with a KV cache from Llama-family causal LMs: the model's own weights, the Llama math once.

`llama_decoder(hf_model, tokenizer, options)` checks that a transformers model is a Llama-family
decoder graphopt can express (RMSNorm, rotary with a static table, SwiGLU MLP, grouped-query
attention, a sliding window, if any, no shorter than the capacity), then traces `LlamaDecoder` with torch.export into the FX form:
a causal-LM `Model` whose signature carries the cache (see `graphopt.ir.decoder` for both forms'
inputs and outputs) and whose `meta.extra["decoder"]` holds its `DecoderSpec`.

The parameters are the Hugging Face model's own, under their own names
(`model.layers.N.self_attn.q_proj.weight`, ...; a tied lm_head stays tied); q/k/v/o, gate/up/down
and lm_head stay ordinary linears. The rotary tables (`rotary_cos`, `rotary_sin`,
[capacity, head_dim / 2]) come from the model's own rotary embedding, so rope scaling (linear,
llama3, yarn) holds; kinds whose tables change with the sequence length (dynamic, longrope) are
refused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.files.reading import shown
from graphopt.ir import Model, TensorSpec
from graphopt.ir.decoder import FORMS, MAX_CAPACITY, DecoderSpec, example_feeds, prefill_feeds

__all__ = ["DecoderOptions", "LlamaDecoder", "llama_decoder", "decoder_spec_of", "decoder_feeds"]

ARCHITECTURES = ("llama", "mistral", "qwen2")  # the same decoder block; qwen2 adds q/k/v biases
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ROTARY_TABLES = ("rotary_cos", "rotary_sin")  # weights, but positions' angles: not for quantizing
DEFAULT_PORTABLE_CAPACITY = 1024
DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class DecoderOptions:
    """How to build a decoder: the attention form, the capacity (the longest context, prompt +
    generated tokens; default: the model's max_position_embeddings for "ort", 1024 for
    "portable") and the prefill chunk (tokens per prefill step, the portable prefill graph's S;
    default 128, at most the capacity: on ORT CPU a 1024-token prompt prefills faster in chunks
    of 128 than whole, and its logits take an eighth of the memory)."""

    attention: str = "ort"
    capacity: int | None = None
    prefill_chunk: int | None = None

    def __post_init__(self):
        if self.attention not in FORMS:
            raise OptionError(f"decoder option 'attention' must be one of {', '.join(FORMS)}, "
                              f"got {shown(self.attention)}")
        for name in ("capacity", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_CAPACITY):
                raise OptionError(f"decoder option '{name}' must be an integer in [1, {MAX_CAPACITY}], "
                                  f"got {shown(value)}")

    @classmethod
    def from_value(cls, value: Any) -> "DecoderOptions":
        """Options from `True` (defaults), a mapping of option names, or DecoderOptions itself."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise OptionError(f"decoder= takes True, a mapping of options or DecoderOptions, got {shown(value)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise OptionError(f"unknown decoder option {shown(unknown[0])} (options: {', '.join(sorted(known))})")
        return cls(**value)


def _rms_norm(x, norm):
    """Hugging Face's LlamaRMSNorm, computed in float32 as it does."""
    import torch

    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _mlp(x, mlp):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    import torch

    return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def _module_class():
    import torch

    from graphopt.ir.attention import apply_rotary, group_query_attention, grouped_attention

    class _LlamaDecoder(torch.nn.Module):
        """The Llama decoder block, once, around the Hugging Face model's own modules."""

        def __init__(self, hf, spec: DecoderSpec, cos: torch.Tensor, sin: torch.Tensor):
            super().__init__()
            self.model = hf.model  # parameter names stay model.layers.N... and lm_head.weight
            self.lm_head = hf.lm_head
            self.register_buffer(ROTARY_TABLES[0], cos)
            self.register_buffer(ROTARY_TABLES[1], sin)
            self.spec = spec
            self.scale = spec.head_dim ** -0.5

        def forward(self, input_ids, *inputs):
            if self.spec.form == "ort":
                attention_mask, past = inputs[0], inputs[1:]
                attend = self._ort_attention
                extra = (attention_mask,)
            else:
                position_ids, attention_mask, past = inputs[0], inputs[1], inputs[2:]
                cos = torch.nn.functional.embedding(position_ids, self.rotary_cos)  # a Gather, not GatherND
                sin = torch.nn.functional.embedding(position_ids, self.rotary_sin)
                attend = self._portable_attention
                extra = (attention_mask, cos, sin)
            hidden = self.model.embed_tokens(input_ids)
            presents = []
            for i, layer in enumerate(self.model.layers):
                attn = layer.self_attn
                x = _rms_norm(hidden, layer.input_layernorm)
                out, key, value = attend(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), past[2 * i],
                                         past[2 * i + 1], *extra)
                hidden = hidden + attn.o_proj(out)
                hidden = hidden + _mlp(_rms_norm(hidden, layer.post_attention_layernorm), layer.mlp)
                presents += [key, value]
            return (self.lm_head(_rms_norm(hidden, self.model.norm)), *presents)

        def _ort_attention(self, q, k, v, past_key, past_value, attention_mask):
            spec = self.spec
            return group_query_attention(q, k, v, past_key, past_value, attention_mask, self.rotary_cos,
                                         self.rotary_sin, spec.heads, spec.kv_heads, self.scale)

        def _portable_attention(self, q, k, v, past_key, past_value, attention_mask, cos, sin):
            spec = self.spec
            batch, seq = q.shape[0], q.shape[1]
            q = apply_rotary(q.view(batch, seq, spec.heads, spec.head_dim).transpose(1, 2), cos, sin)
            k = apply_rotary(k.view(batch, seq, spec.kv_heads, spec.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, seq, spec.kv_heads, spec.head_dim).transpose(1, 2)
            out = grouped_attention(q, [(past_key, past_value), (k, v)], attention_mask, self.scale)
            return out.transpose(1, 2).reshape(batch, seq, spec.heads * spec.head_dim), k, v

    return _LlamaDecoder


def LlamaDecoder(hf, spec: DecoderSpec):
    """The torch module of a decoder (see the module docstring); `hf` is a transformers
    Llama-family causal LM checked by `decoder_spec_of`."""
    import torch

    rotary = hf.model.rotary_emb
    positions = torch.arange(spec.capacity)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [1, capacity, D] = cat(freqs, freqs)
    half = spec.head_dim // 2
    return _module_class()(hf, spec, cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()).eval()


def decoder_spec_of(hf, tokenizer, options: DecoderOptions, where: str) -> DecoderSpec:
    """The spec of `hf` as a decoder with `options`; an UnsupportedGraphError naming what does not
    fit when it is not a Llama-family decoder graphopt can express."""
    config = getattr(hf, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise UnsupportedGraphError(f"{where}: not a Llama-family decoder (model type {shown(arch)}; decoders "
                                    f"are built for {', '.join(ARCHITECTURES)})")
    _check_structure(hf, config, where)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = getattr(hf.model.rotary_emb, "rope_type", rope.get("rope_type", "default"))
    if rope_type not in STATIC_ROPE:
        raise UnsupportedGraphError(f"{where}: rope type '{rope_type}' changes its tables with the sequence "
                                    f"length; decoders support {', '.join(STATIC_ROPE)}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if options.attention == "ort" and head_dim % 16:
        raise UnsupportedGraphError(f"{where}: head_dim {head_dim} is not a multiple of 16, which onnxruntime's "
                                    "GroupQueryAttention needs; build the portable form (attention: portable)")
    longest = int(config.max_position_embeddings)
    portable = options.attention == "portable"
    capacity = options.capacity or (min(DEFAULT_PORTABLE_CAPACITY, longest) if portable else longest)
    window = _sliding_window(config)
    if window is not None and window < capacity:
        raise UnsupportedGraphError(f"{where}: sliding-window attention ({window} tokens) is shorter than the decoder's "
                                    f"capacity ({capacity} tokens), and decoders attend to the whole context: set "
                                    f"the decoder option 'capacity' to at most {window}")
    chunk = options.prefill_chunk or min(DEFAULT_PREFILL_CHUNK, capacity)
    if chunk > capacity:
        raise OptionError(f"{where}: decoder option 'prefill_chunk' ({chunk}) is larger than the capacity "
                          f"({capacity}); a prefill step cannot hold more tokens than the cache")
    spec = DecoderSpec(
        form=options.attention, architecture=arch, layers=config.num_hidden_layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, hidden=config.hidden_size, vocab=config.vocab_size, capacity=capacity,
        prefill_chunk=chunk, rope={"type": rope_type, "tables": list(ROTARY_TABLES),
                                   **{k: v for k, v in rope.items() if k != "rope_type"}},
        eos_token_ids=_eos_ids(hf, tokenizer), bos_token_id=_token_id(config, tokenizer, "bos"),
        pad_token_id=_token_id(config, tokenizer, "pad"),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        tokenizer="hf" if tokenizer is not None else "bytes")
    spec.check(where, UnsupportedGraphError)
    return spec


def _check_structure(hf, config, where: str) -> None:
    """The modules and settings the decoder block reads, each named when missing or different."""
    if getattr(config, "hidden_act", None) != "silu":
        raise UnsupportedGraphError(f"{where}: MLP activation {shown(getattr(config, 'hidden_act', None))}, "
                                    "decoders support 'silu' (SwiGLU)")
    model = getattr(hf, "model", None)
    parts = {"model.embed_tokens": getattr(model, "embed_tokens", None), "model.norm": getattr(model, "norm", None),
             "model.rotary_emb": getattr(model, "rotary_emb", None), "lm_head": getattr(hf, "lm_head", None)}
    layers = getattr(model, "layers", None) or []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            parts[f"model.layers.{i}.self_attn.{name}"] = getattr(attn, name, None)
        for name in ("gate_proj", "up_proj", "down_proj"):
            parts[f"model.layers.{i}.mlp.{name}"] = getattr(mlp, name, None)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            parts[f"model.layers.{i}.{name}"] = norm if hasattr(norm, "variance_epsilon") else None
        extra = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
        if extra:
            raise UnsupportedGraphError(f"{where}: model.layers.{i}.self_attn has {extra[0]} (query/key norms); "
                                        "decoders do not support it yet")
    missing = [name for name, module in parts.items() if module is None]
    if missing or not layers:
        raise UnsupportedGraphError(f"{where}: not a Llama-family decoder: no {missing[0] if missing else 'layers'}")


def _sliding_window(config) -> int | None:
    """The window of the layers that attend to the last N tokens only (None: every layer attends to the
    whole context). A window at least the capacity never takes effect: the decoder computes the same."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _config_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _eos_ids(hf, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the config's, the generation config's and the tokenizer's, in that order."""
    ids = _config_ids(getattr(hf.config, "eos_token_id", None))
    ids += _config_ids(getattr(getattr(hf, "generation_config", None), "eos_token_id", None))
    ids += _config_ids(getattr(tokenizer, "eos_token_id", None))
    vocab = hf.config.vocab_size
    return tuple(dict.fromkeys(i for i in ids if 0 <= i < vocab))


def _token_id(config, tokenizer, kind: str) -> int | None:
    value = getattr(tokenizer, f"{kind}_token_id", None)
    value = value if value is not None else getattr(config, f"{kind}_token_id", None)
    ids = _config_ids(value)
    return ids[0] if ids and 0 <= ids[0] < config.vocab_size else None


def decoder_feeds(model: Model, windows: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per token window (a row of `windows`' arrays): its prefill from an empty cache, what
    a decoder calibrates and is checked on (a GraphoptError when a window is longer than the capacity)."""
    spec = DecoderSpec.of(model)
    return [prefill_feeds(spec, row[None]) for w in windows for row in np.atleast_2d(w)]


def llama_decoder(hf, tokenizer=None, options: DecoderOptions | dict | bool = True, *, name: str = "decoder",
                  sample_inputs: list[dict[str, np.ndarray]] | None = None, log=print) -> Model:
    """A Llama-family transformers causal LM as a decoder Model in the FX form (see the module docstring).

    `tokenizer` None means a byte vocabulary (ids are UTF-8 bytes). `sample_inputs` (feeds for the
    pass manager's checks) default to a prefill of a short text from an empty cache.
    """
    import torch

    options = DecoderOptions.from_value(options)
    spec = decoder_spec_of(hf, tokenizer, options, f"'{name}'")
    start = time.perf_counter()
    kinds = sorted({str(p.dtype) for p in hf.parameters()} - {"torch.float32"})
    if kinds:
        raise UnsupportedGraphError(f"'{name}': decoders are built from float32 weights, found {kinds[0]}; load the "
                                    "model with dtype=torch.float32")
    module = LlamaDecoder(hf.eval(), spec)
    example = example_feeds(spec)
    args = [torch.from_numpy(np.ascontiguousarray(example[n])) for n in spec.input_names]
    dynamic = torch.export.Dim.DYNAMIC
    axes = spec.input_shapes()
    shapes = [{axis: dynamic for axis, size in enumerate(axes[n]) if isinstance(size, str)} for n in spec.input_names]
    try:
        program = torch.export.export(module, tuple(args), strict=False,
                                      dynamic_shapes={"input_ids": shapes[0], "inputs": tuple(shapes[1:])})
    except Exception as exc:  # torch.export raises many types; the user needs the model's name
        raise UnsupportedGraphError(f"'{name}': torch.export could not trace the decoder: "
                                    f"{type(exc).__name__}: {shown(str(exc), 300)}") from exc
    if sample_inputs is None:
        text = "graphopt compiles models for phones and NPUs."
        ids = (tokenizer(text, return_tensors="np")["input_ids"] if tokenizer is not None
               else np.frombuffer(text.encode(), np.uint8)[None])
        sample_inputs = [prefill_feeds(spec, ids[:, :spec.capacity])]
    dtypes = spec.input_dtypes()
    model = Model(fx=program.module(), task="causal-lm", name=name, tokenizer=tokenizer, sample_inputs=sample_inputs,
                  inputs=[TensorSpec(n, dtypes[n], shape) for n, shape in axes.items()],
                  outputs=[TensorSpec(n, spec.output_dtypes()[n], shape) for n, shape in spec.output_shapes().items()])
    model.meta.extra["decoder"] = spec.to_json()
    log(f"decoder: {spec.form} form, {spec.layers} layers, {spec.heads}/{spec.kv_heads} heads of {spec.head_dim}, "
        f"capacity {spec.capacity}, traced in {time.perf_counter() - start:.1f} s")
    return model
