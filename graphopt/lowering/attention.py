"""`graphopt::group_query_attention` -> onnxruntime's `com.microsoft:GroupQueryAttention`.

The dynamo exporter builds every node through an onnx OpSchema, and onnx knows no com.microsoft
schemas, so the schema of the inputs and attributes used here is declared below. The translation
emits what onnxruntime-genai's builder emits: rotary inside the op (do_rotary 1, not interleaved,
cos / sin tables [positions, head_dim / 2]), and the valid lengths from attention_mask:
seqlens_k = ReduceSum(mask, axis 1) - 1 as int32, total_sequence_length = mask's second dimension
as int32. The op then accepts past as a growing cache or as a buffer of fixed capacity bound to
present too (onnxruntime-genai's past_present_share_buffer).
"""

from __future__ import annotations

import functools

__all__ = ["translation_table", "LOWERING_VERSION"]

LOWERING_VERSION = "gqa-1"  # part of the export cache key: bump when the translation changes


@functools.cache
def _gqa_op():
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    single = OpSchema.FormalParameterOption.Single
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache"]
    types = ["T", "T", "T", "T", "T", "M", "M", "T", "T"]
    required = {"query", "seqlens_k", "total_sequence_length"}
    inputs = [param(n, t, "", param_option=single if n in required else optional) for n, t in zip(names, types)]
    outputs = [param("output", "T", ""), param("present_key", "T", ""), param("present_value", "T", "")]
    kind = OpSchema.AttrType
    attributes = [OpSchema.Attribute("num_heads", kind.INT, "", required=True),
                  OpSchema.Attribute("kv_num_heads", kind.INT, "", required=True),
                  OpSchema.Attribute("scale", kind.FLOAT, "", required=False),
                  OpSchema.Attribute("do_rotary", kind.INT, "", required=False),
                  OpSchema.Attribute("rotary_interleaved", kind.INT, "", required=False)]
    schema = OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                      attributes=attributes)
    return Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)


def _lower_group_query_attention(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache,
                                 num_heads, kv_heads, scale):
    import onnx
    from onnxscript import opset21 as op

    int32 = onnx.TensorProto.INT32
    summed = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
    seqlens_k = op.Cast(op.Sub(summed, op.Constant(value_int=1)), to=int32)
    total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0), to=int32)
    return _gqa_op()(query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
                     num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale), do_rotary=1,
                     rotary_interleaved=0)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: graphopt's ops -> their ONNX form."""
    from graphopt.ir.attention import ATTENTION_OP

    return {ATTENTION_OP: _lower_group_query_attention}
