"""What a decoder Model is: its spec (forms, names, sizes, cache), and the feeds it takes.

A decoder is an ordinary causal-LM `Model` whose signature carries a KV cache; its spec lives,
JSON-able, in `model.meta.extra["decoder"]` (`DecoderSpec.of(model)` reads it back). Two forms:

- "ort": one graph for prefill and decode. Inputs `input_ids` [batch, S], `attention_mask` int64
  [batch, past + S] (ones over the tokens so far), `past_key_values.N.key/value`
  [batch, kv_heads, past, head_dim]; outputs `logits` [batch, S, vocab] and `present.N.key/value`
  (past with the new rows appended). Attention is `graphopt::group_query_attention`, lowered to
  onnxruntime's GroupQueryAttention, which also runs past as a buffer of fixed capacity shared
  with present.
- "portable": standard ops and a static cache of `capacity` slots ("smart mask"). Inputs
  `input_ids` [1, S], `position_ids` [1, S], `attention_mask` float [1, 1, S, capacity + S]
  (additive: 0 where a query sees a cache slot or a new row, `mask_value` elsewhere),
  `past_key_values.N.key/value` [1, kv_heads, capacity, head_dim], read only; outputs `logits`
  and `present.N.key/value` [1, kv_heads, S, head_dim], the new rows only, which the host writes
  into the slots it chose. Saved as two static graphs: prefill (S = prefill_chunk) and decode
  (S = 1).

`prefill_feeds` turns token ids into the feeds of a prefill from an empty cache: what
calibration, evaluation and the pass manager's fidelity checks run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.files.reading import shown, want_bool, want_dict, want_int, want_list, want_number, want_str

__all__ = ["DecoderSpec", "FORMS", "CACHE_DTYPES", "prefill_feeds", "example_feeds", "smart_mask", "position_tables", "MAX_CAPACITY",
           "set_kv_heads", "empty_cache_as"]

FORMS = ("ort", "portable")
CACHE_DTYPES = ("float32", "int8")
MAX_CAPACITY = 1 << 20  # tokens; no on-device context comes near
# the portable form's additive mask of an invisible slot: low enough that softmax gives it no weight next to any
# score, and within float16's range (a graph may keep the mask in half precision)
MASK_RANGE = (-65504.0, -1000.0)
_LIMITS = {"layers": 512, "heads": 1024, "kv_heads": 1024, "head_dim": 4096, "hidden": 1 << 16, "vocab": 1 << 22}


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder's shape and contract, JSON-able (`to_json` / `from_json`).

    capacity: the longest context (prompt + generated tokens) the model serves: the static
    cache's slots (portable) or the rotary table's positions and the cache buffer's limit (ort).
    prefill_chunk: tokens per prefill step (portable: the prefill graph's static S).
    rope: how the rotary tables were made ({"type", "rope_theta", ...}) and their names ("tables":
    the weights [capacity, head_dim / 2] holding cos and sin of every position's angles; a pass
    should leave them alone: the portable form reads them with Gather, like an embedding).
    tokenizer: "hf" (tokenizer files beside the graphs) or "bytes" (ids are UTF-8 bytes).
    cache_dtype: how the cache is stored: "float32", or "int8" codes whose scales the graph holds
    (the `quantize_kv` pass); past and present tensors, and the host's cache buffers, have this type.
    """

    form: str
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    capacity: int
    prefill_chunk: int
    rope: dict = dataclasses.field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: bool = False
    tokenizer: str = "hf"
    mask_value: float = -1e4  # portable: additive mask of an invisible slot (fp16-safe, quantizes well)
    cache_dtype: str = "float32"  # the past/present tensors' element type: CACHE_DTYPES (int8: `quantize_kv`)

    # ------------------------------------------------------------------ names
    def cache_names(self, prefix: str) -> list[str]:
        """`prefix`.N.key, `prefix`.N.value for every layer, in the graph's order."""
        return [f"{prefix}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    @property
    def past_names(self) -> list[str]:
        return self.cache_names("past_key_values")

    @property
    def present_names(self) -> list[str]:
        return self.cache_names("present")

    @property
    def input_names(self) -> list[str]:
        head = ["input_ids", "attention_mask"] if self.form == "ort" else ["input_ids", "position_ids", "attention_mask"]
        return head + self.past_names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names

    def input_shapes(self, seq: int | str = "sequence_length") -> dict[str, tuple[int | str, ...]]:
        """Input name -> shape (str entries are dynamic axes)."""
        kv = (self.kv_heads, self.head_dim)
        if self.form == "ort":
            past = ("batch_size", kv[0], "past_sequence_length", kv[1])
            shapes = {"input_ids": ("batch_size", seq), "attention_mask": ("batch_size", "total_sequence_length")}
        else:
            past = (1, kv[0], self.capacity, kv[1])
            width = self.capacity + seq if isinstance(seq, int) else f"{self.capacity} + {seq}"
            shapes = {"input_ids": (1, seq), "position_ids": (1, seq), "attention_mask": (1, 1, seq, width)}
        return {**shapes, **{name: past for name in self.past_names}}

    def output_shapes(self, seq: int | str = "sequence_length") -> dict[str, tuple[int | str, ...]]:
        batch = "batch_size" if self.form == "ort" else 1
        rows = "total_sequence_length" if self.form == "ort" else seq
        present = (batch, self.kv_heads, rows, self.head_dim)
        return {"logits": (batch, seq, self.vocab), **{name: present for name in self.present_names}}

    def input_dtypes(self) -> dict[str, str]:
        ints = {"input_ids", "position_ids"} | ({"attention_mask"} if self.form == "ort" else set())
        return {name: "int64" if name in ints else self.cache_dtype if name.startswith("past_key_values.")
                else "float32" for name in self.input_names}

    def output_dtypes(self) -> dict[str, str]:
        return {"logits": "float32", **{name: self.cache_dtype for name in self.present_names}}

    # ------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "decoder spec", error=ModelLoadError) -> "DecoderSpec":
        """A spec from JSON (a model's metadata or a decoder folder's config), every field checked."""
        data = want_dict(data, where, error)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise error(f"{where}: unknown field {shown(unknown[0])}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if missing:
            raise error(f"{where}: missing field '{missing[0]}'")
        field = f"{where}: field"
        form = want_str(data["form"], f"{field} 'form'", error)
        if form not in FORMS:
            raise error(f"{field} 'form' must be one of {', '.join(FORMS)}, got {shown(form)}")
        sizes = {name: want_int(data[name], f"{field} '{name}'", error, lo=1, hi=hi) for name, hi in _LIMITS.items()}
        capacity = want_int(data["capacity"], f"{field} 'capacity'", error, lo=1, hi=MAX_CAPACITY)
        chunk = want_int(data["prefill_chunk"], f"{field} 'prefill_chunk'", error, lo=1, hi=capacity)
        eos = tuple(want_int(v, f"{field} 'eos_token_ids'", error, lo=0, hi=sizes["vocab"] - 1)
                    for v in want_list(data.get("eos_token_ids", []), f"{field} 'eos_token_ids'", error, max_len=64))
        optional_ids = {}
        for name in ("bos_token_id", "pad_token_id"):
            value = data.get(name)
            optional_ids[name] = None if value is None else want_int(value, f"{field} '{name}'", error, lo=0,
                                                                     hi=sizes["vocab"] - 1)
        tokenizer = want_str(data.get("tokenizer", "hf"), f"{field} 'tokenizer'", error)
        if tokenizer not in ("hf", "bytes"):
            raise error(f"{field} 'tokenizer' must be 'hf' or 'bytes', got {shown(tokenizer)}")
        cache_dtype = want_str(data.get("cache_dtype", "float32"), f"{field} 'cache_dtype'", error)
        if cache_dtype not in CACHE_DTYPES:
            raise error(f"{field} 'cache_dtype' must be one of {', '.join(CACHE_DTYPES)}, got {shown(cache_dtype)}")
        mask_value = want_number(data.get("mask_value", -1e4), f"{field} 'mask_value'", error)
        if not MASK_RANGE[0] <= mask_value <= MASK_RANGE[1]:
            raise error(f"{field} 'mask_value' must be in [{MASK_RANGE[0]:g}, {MASK_RANGE[1]:g}] (an invisible slot "
                        f"must get no attention), got {shown(mask_value)}")
        rope = want_dict(data.get("rope", {}), f"{field} 'rope'", error)
        for name in want_list(rope.get("tables", []), f"{field} 'rope': 'tables'", error, max_len=16):
            want_str(name, f"{field} 'rope': 'tables'", error, max_len=256)
        spec = cls(form=form, architecture=want_str(data["architecture"], f"{field} 'architecture'", error, max_len=64),
                   capacity=capacity, prefill_chunk=chunk, eos_token_ids=eos, tokenizer=tokenizer, rope=rope,
                   chat_template=want_bool(data.get("chat_template", False), f"{field} 'chat_template'", error),
                   mask_value=mask_value,
                   cache_dtype=cache_dtype, **sizes, **optional_ids)
        spec.check(where, error)
        return spec

    def check(self, where: str, error=GraphoptError) -> None:
        """Refuse sizes that contradict each other."""
        if self.heads % self.kv_heads:
            raise error(f"{where}: {self.heads} attention heads are not a multiple of {self.kv_heads} key/value heads")
        if self.head_dim % 2:
            raise error(f"{where}: head_dim {self.head_dim} is odd; rotary needs pairs of channels")
        if self.prefill_chunk > self.capacity:
            raise error(f"{where}: prefill_chunk {self.prefill_chunk} is larger than the capacity {self.capacity}")

    @classmethod
    def of(cls, model) -> "DecoderSpec | None":
        """The spec of a decoder Model (None for any other model)."""
        data = model.meta.extra.get("decoder")
        return None if data is None else cls.from_json(data, f"model '{model.name}': decoder spec", GraphoptError)


def position_tables(model) -> frozenset[str]:
    """The rotary tables of a decoder Model (empty for any other model): position data read by
    position id (a Gather in the portable form), never an embedding to rotate or a weight to quantize."""
    spec = DecoderSpec.of(model)
    return frozenset(spec.rope.get("tables", ())) if spec is not None else frozenset()


def set_kv_heads(model, removed: list[np.ndarray]) -> DecoderSpec:
    """Record that decoder `model` (ONNX form) lost the key/value heads `removed[N]` in layer N, the
    same count in every layer (the spec holds one kv_heads).

    Rewrites the spec in `model.meta.extra` (kv_heads, and heads: the same query heads per KV
    group), dim 1 of every `past_key_values.N.*` input and `present.N.*` output (graph and
    signature), and the model's sample inputs (their cache loses the removed heads' rows); returns
    the new spec. The graph's attention must already compute with the kept heads (a pruning pass's job).
    """
    model.require("onnx", "set_kv_heads")
    spec = DecoderSpec.of(model)
    if spec is None:
        raise GraphoptError(f"set_kv_heads: '{model.name}' is not a decoder (no decoder spec in its metadata)")
    if spec.cache_dtype != "float32":
        raise GraphoptError(f"set_kv_heads: '{model.name}' keeps its cache as {spec.cache_dtype} codes with a scale per "
                            "head (quantize_kv); remove key/value heads before quantize_kv runs")
    counts = {len(r) for r in removed}
    if len(removed) != spec.layers or len(counts) != 1 or not 0 < counts.pop() < spec.kv_heads:
        raise GraphoptError(f"set_kv_heads: '{model.name}' has {spec.layers} layers of {spec.kv_heads} key/value heads; "
                            f"removing {[len(r) for r in removed]} per layer would not leave one kv_heads for all")
    kv_heads = spec.kv_heads - len(removed[0])
    new = dataclasses.replace(spec, kv_heads=kv_heads, heads=spec.heads // spec.kv_heads * kv_heads)
    layer_of = {name: i // 2 for i, name in enumerate(spec.past_names)}
    layer_of.update({name: i // 2 for i, name in enumerate(spec.present_names)})
    for tensor in model.graph.inputs + model.graph.outputs:
        if tensor.name in layer_of and tensor.shape is not None:
            tensor.shape = [tensor.shape[0], kv_heads, *tensor.shape[2:]]
    model.inputs, model.outputs = ([dataclasses.replace(t, shape=(t.shape[0], kv_heads, *t.shape[2:]))
                                    if t.name in layer_of else t for t in specs]
                                   for specs in (model.inputs, model.outputs))
    model.sample_inputs = [{name: np.delete(value, removed[layer_of[name]], axis=1) if name in layer_of else value
                            for name, value in feeds.items()} for feeds in model.sample_inputs]
    model.meta.extra["decoder"] = new.to_json()
    return new


def smart_mask(visible_slots: np.ndarray, seq: int, value: float) -> np.ndarray:
    """The portable form's additive mask [1, 1, seq, capacity + seq] for `seq` new rows.

    Every new row sees the cache slots where `visible_slots` (bool [capacity]) is true, and the new
    rows up to its own (causal); 0 where visible, `value` elsewhere.
    """
    capacity = visible_slots.shape[0]
    mask = np.full((1, 1, seq, capacity + seq), value, dtype=np.float32)
    mask[..., :capacity][..., visible_slots] = 0.0
    mask[0, 0, :, capacity:][np.tril(np.ones((seq, seq), dtype=bool))] = 0.0
    return mask


def prefill_feeds(spec: DecoderSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds that run `ids` ([seq] or [batch, seq]) as a prefill from an empty cache.

    The ort form takes any batch; the portable form one sequence at a time. A sequence longer
    than the capacity is refused: the model could never hold it.
    """
    ids = np.atleast_2d(np.asarray(ids)).astype(np.int64)
    batch, seq = ids.shape
    if seq > spec.capacity:
        raise GraphoptError(f"a prefill of {seq} tokens does not fit the decoder's capacity of {spec.capacity} "
                            "tokens; build the decoder with a larger capacity or use shorter windows")
    past_shape = (batch, spec.kv_heads, 0 if spec.form == "ort" else spec.capacity, spec.head_dim)
    if spec.form == "ort":
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64)}
    else:
        if batch != 1:
            raise GraphoptError(f"the portable decoder runs one sequence at a time, got a batch of {batch}; "
                                "feed the windows one by one")
        empty = np.zeros(spec.capacity, dtype=bool)
        feeds = {"input_ids": ids, "position_ids": np.arange(seq, dtype=np.int64)[None],
                 "attention_mask": smart_mask(empty, seq, spec.mask_value)}
    past = np.zeros(past_shape, spec.cache_dtype)
    return {**feeds, **{name: past for name in spec.past_names}}


def empty_cache_as(spec: DecoderSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` with their cache entries in `spec.cache_dtype`. Only an empty cache (no rows, or all
    zeros: what a prefill from scratch feeds) converts: a float cache holding values has no codes
    without the graph's scales, so it is refused by name."""
    out = dict(feeds)
    for name in spec.past_names:
        value = feeds.get(name)
        if value is None or value.dtype == np.dtype(spec.cache_dtype):
            continue
        if value.size and np.any(value):
            raise GraphoptError(f"feed '{name}' holds cache values as {value.dtype}; the decoder's cache is "
                                f"{spec.cache_dtype} codes, so only an empty cache converts")
        out[name] = np.zeros(value.shape, spec.cache_dtype)
    return out


def example_feeds(spec: DecoderSpec) -> dict[str, np.ndarray]:
    """Feeds to trace and export with: sizes of 2 or more on every dynamic axis (torch.export
    fixes an axis seen at size 0 or 1), a cache holding two tokens for the ort form."""
    rng = np.random.default_rng(0)
    seq, batch, past = 3, 2, 2
    if spec.form == "portable":
        return prefill_feeds(spec, rng.integers(0, spec.vocab, (1, seq)))
    feeds = {"input_ids": rng.integers(0, spec.vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64)}
    cache = np.zeros((batch, spec.kv_heads, past, spec.head_dim), spec.cache_dtype)
    return {**feeds, **{name: cache for name in spec.past_names}}
