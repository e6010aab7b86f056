"""The FX form's one attention op for decoders with a KV cache, and the attention math written once.

`graphopt::group_query_attention` is a torch custom op: a decoder's attention core (rotary,
past + new keys, causal softmax, grouped heads) as one node, which lowering turns into
onnxruntime's `com.microsoft:GroupQueryAttention` (see `graphopt.lowering.attention`). Its
projections (q/k/v/o) stay ordinary linears outside it, so passes see nothing new.

`apply_rotary` and `grouped_attention` are the math both decoder forms share: the op's eager
reference uses them, and so does the portable (standard-ops) decoder in
`graphopt.frontends.decoder`.
"""

from __future__ import annotations

import torch

from graphopt.errors import UnsupportedGraphError

__all__ = ["group_query_attention", "apply_rotary", "grouped_attention", "ATTENTION_OP"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, non-interleaved (Hugging Face Llama's rotate_half): x [B, heads, S, D],
    cos / sin [B, S, D/2] (the first half of HF's cat(freqs, freqs) tables)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def grouped_attention(q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + mask)·V with K/V given as blocks along the key axis, never repeated per head.

    q [B, H, S, D]; each block (K, V) is [B, Hkv, T_i, D]; mask [B, 1, S, ΣT_i] is additive. Query
    head h reads key/value head h // (H / Hkv), as Hugging Face's repeat_kv does, but the queries
    are grouped per key/value head instead ([B, Hkv, rep·S, D]), so K and V are read in place and
    the blocks (cache, new rows) are never concatenated. Returns [B, H, S, D].
    """
    batch, heads, seq, dim = q.shape
    kv_heads = blocks[0][0].shape[1]
    rep = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, rep * seq, dim)
    scores = torch.cat([grouped @ k.transpose(-1, -2) for k, _ in blocks], dim=-1) * scale
    scores = scores.reshape(batch, kv_heads, rep, seq, -1) + mask[:, :, None]
    probs = scores.softmax(-1).reshape(batch, kv_heads, rep * seq, -1)
    out, start = None, 0
    for k, v in blocks:
        length = k.shape[2]
        part = probs[..., start:start + length] @ v
        out = part if out is None else out + part
        start += length
    return out.reshape(batch, heads, seq, dim)


@torch.library.custom_op("graphopt::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_mask: torch.Tensor, cos_cache: torch.Tensor,
                          sin_cache: torch.Tensor, num_heads: int, kv_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of S new tokens over a growing cache, with rotary inside (GroupQueryAttention's contract).

    query [B, S, H·D], key / value [B, S, Hkv·D] before rotary; past_key / past_value
    [B, Hkv, P, D] (keys stored after rotary); attention_mask int64 [B, P + S], ones over the
    tokens so far; cos_cache / sin_cache [positions, D/2]. The new tokens sit at positions
    mask.sum(-1) - S + (0 .. S-1); each sees the keys at positions up to its own. Returns the
    attention output [B, S, H·D] and present_key / present_value = past with the new rows
    appended [B, Hkv, P + S, D].

    This is the reference the FX form runs; onnxruntime's GroupQueryAttention computes the same
    and also accepts past as a buffer of fixed capacity shared with present (P >= P + S).
    """
    batch, seq, _ = query.shape
    dim = past_key.shape[-1]
    if past_key.shape[2] + seq != attention_mask.shape[1]:
        raise UnsupportedGraphError(
            f"group_query_attention: attention_mask covers {attention_mask.shape[1]} tokens, but past holds "
            f"{past_key.shape[2]} and {seq} are new; the mask must cover past + new tokens")
    positions = (attention_mask.sum(-1) - seq)[:, None] + torch.arange(seq)[None]  # [B, S]
    cos, sin = cos_cache[positions], sin_cache[positions]
    q = apply_rotary(query.view(batch, seq, num_heads, dim).transpose(1, 2), cos, sin)
    k = apply_rotary(key.view(batch, seq, kv_heads, dim).transpose(1, 2), cos, sin)
    v = value.view(batch, seq, kv_heads, dim).transpose(1, 2)
    keys = torch.arange(past_key.shape[2] + seq)
    visible = keys[None, None, :] <= positions[:, :, None]  # [B, S, P + S]
    mask = torch.zeros(visible.shape, dtype=query.dtype).masked_fill(~visible, float("-inf"))[:, None]
    out = grouped_attention(q, [(past_key, past_value), (k, v)], mask, scale)
    out = out.transpose(1, 2).reshape(batch, seq, num_heads * dim)
    return out, torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)


@group_query_attention.register_fake
def _group_query_attention_fake(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache,
                                num_heads, kv_heads, scale):
    batch, seq, width = query.shape
    total = attention_mask.shape[1]
    present = past_key.new_empty(batch, kv_heads, total, past_key.shape[3])
    return query.new_empty(batch, seq, width), present, present.new_empty(present.shape)


ATTENTION_OP = torch.ops.graphopt.group_query_attention.default
