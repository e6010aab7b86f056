"""fuse_ort_ops: fused RMSNorms and packed linears compute what the unfused tiny Llama decoder computes."""

import collections
import functools

import numpy as np
import pytest

import graphopt
from graphopt.passes import FuseOrtOps, Quantize, Rotate, UseOrtKernels
from graphopt.pipeline.passes import PassContext
from tests.decoding import tiny_decoder, tiny_feeds

PREPARED = {
    "fp32": [],
    "w4": [Rotate(), Quantize(weight_bits=4, weight_granularity="block", weight_block_size=16, activation_bits=0,
                              embedding_bits=8, int16_weights=["model.norm.rotated_gain"]), UseOrtKernels()],
    "w8a8": [Quantize(weight_bits=8, activation_bits=8), UseOrtKernels()],
}
KERNEL = {"fp32": "MatMul", "w4": "MatMulNBits", "w8a8": "MatMulIntegerToFloat"}
LAYERS = 2  # the tiny Llama: 2 layers of q/k/v/o/gate/up/down, a tied lm_head


def _quiet(*_):
    pass


@functools.cache
def _prepared(form: str):
    calib, _ = tiny_feeds()
    if not PREPARED[form]:
        return graphopt.lower(tiny_decoder("ort"), log=_quiet)
    return graphopt.Pipeline(PREPARED[form], log=_quiet).run(tiny_decoder("ort"), calib=calib).model


def _outputs(model):
    session = model.session(threads=1)
    return [session.run(None, f) for f in tiny_feeds()[1]]


def _max_error(model, reference) -> float:
    return max(float(np.abs(a - b).max()) for got, ref in zip(_outputs(model), reference) for a, b in zip(got, ref))


def _fused(form: str, **options):
    return FuseOrtOps(**options).run(_prepared(form).copy(), PassContext(progress=False))


@pytest.mark.parametrize("form", list(PREPARED))
def test_fused_graph_computes_what_the_unfused_one_does(form):
    result = _fused(form)
    assert result.changed
    ops = collections.Counter(n.op for n in result.model.graph.nodes)
    # 2 norms a layer and the final one: all but the first (of the embedding) read a residual sum
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS and ops["ReduceMean"] == ops["Pow"] == 1
    # q/k/v packed into the attention's query, gate/up into one kernel and a Split; o, down, lm_head alone
    assert result.stats["packed_into_attention"] == LAYERS and ops["Split"] == LAYERS
    assert ops[KERNEL[form]] == 4 * LAYERS + 1
    gqa = [n for n in result.model.graph.nodes if n.op == "GroupQueryAttention"]
    assert all(n.inputs[0].inputs[0].op == KERNEL[form] and not n.inputs[1].name for n in gqa)
    error = _max_error(result.model, _outputs(_prepared(form)))
    assert error <= 2e-5, error  # logits and every present K/V: float rounding in the norm only
    assert not FuseOrtOps().run(result.model.copy(), PassContext(progress=False)).changed


def test_each_rule_alone_and_a_wrong_fusion_fails_the_same_check():
    reference = _outputs(_prepared("w4"))
    norms, packs = _fused("w4", pack=False), _fused("w4", norms=False)
    assert norms.stats["packed"] == 0 and norms.stats["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert packs.stats["packed"] == 2 * LAYERS and packs.stats["SkipSimplifiedLayerNormalization"] == 0
    assert max(_max_error(norms.model, reference), _max_error(packs.model, reference)) <= 2e-5
    broken = _fused("w4", norms=False).model  # gate and up swapped in the Split: the check above must see it
    split = next(n for n in broken.graph.nodes if n.op == "Split")
    first, second = split.outputs[0], split.outputs[1]
    split.outputs[0], split.outputs[1] = second, first
    assert _max_error(broken, reference) > 1e-3


def test_norm_with_another_reader_in_the_middle_is_left_alone():
    model = _prepared("fp32").copy()
    second = [n for n in model.graph.nodes if n.op == "ReduceMean"][1]  # the first norm of a residual sum
    model.graph.outputs.append(second.outputs[0])  # its mean is also a graph output: fusing would lose it
    result = FuseOrtOps(pack=False).run(model, PassContext(progress=False))
    assert result.stats["SkipSimplifiedLayerNormalization"] == 2 * LAYERS - 1
    assert collections.Counter(n.op for n in result.model.graph.nodes)["ReduceMean"] == 2


def test_offset_corrections_are_added_before_the_split():
    """W4 with float offsets (`weight_offset`): each packed kernel's offset correction is packed too and
    added once, before the one Split (q/k/v: straight into the attention), instead of a Split and an
    Add per linear; the same numbers."""
    calib, _ = tiny_feeds()
    steps = [Quantize(weight_bits=4, weight_granularity="block", weight_block_size=16, weight_symmetric=False,
                      weight_offset=True, activation_bits=0, embedding_bits=8), UseOrtKernels()]
    prepared = graphopt.Pipeline(steps, log=_quiet).run(tiny_decoder("ort"), calib=calib).model
    result = FuseOrtOps().run(prepared.copy(), PassContext(progress=False))
    assert result.stats["adds_before_split"] == 2 * LAYERS and result.stats["packed_into_attention"] == LAYERS
    ops = collections.Counter(n.op for n in result.model.graph.nodes)
    assert ops["Split"] == LAYERS  # gate/up only
    for gqa in [n for n in result.model.graph.nodes if n.op == "GroupQueryAttention"]:
        add = gqa.inputs[0].inputs[0]
        assert add.op == "Add" and {t.inputs[0].op for t in add.inputs} == {"MatMulNBits", "MatMul"}
    assert _max_error(result.model, _outputs(prepared)) <= 2e-5
