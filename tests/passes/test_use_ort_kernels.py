"""use_ort_kernels: QDQ weights become MatMulNBits / MatMulIntegerToFloat with the same codes, and outputs agree."""

import collections
import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt.errors import OptionError
from graphopt.ir.runtime import ort_session
from graphopt.passes import Quantize, UseOrtKernels
from graphopt.pipeline.passes import PassContext
from graphopt.quant import ort_layouts
from tests.decoding import tiny_decoder, tiny_feeds

RECIPES = {
    "w8a8": dict(weight_bits=8, activation_bits=8),  # asymmetric uint8 weights
    "w8a8-symmetric": dict(weight_bits=8, weight_symmetric=True, activation_bits=8),
    "w4": dict(weight_bits=4, weight_granularity="block", weight_block_size=16, activation_bits=0, embedding_bits=8),
    "w4a16": dict(weight_bits=4, weight_granularity="block", weight_block_size=16, activation_bits=16,
                  embedding_bits=8, weight_symmetric=False),
    "w8": dict(weight_bits=8, activation_bits=0, weight_symmetric=True),
}
KERNELS = {"w8a8": {"MatMulIntegerToFloat": 15}, "w8a8-symmetric": {"MatMulIntegerToFloat": 15},
           "w4": {"MatMulNBits": 15}, "w4a16": {"MatMulNBits": 15}, "w8": {"MatMulNBits": 15}}
EXACT = UseOrtKernels(accuracy_level_4bit=0, accuracy_level_8bit=0)


def _quiet(*_):
    pass


@functools.cache
def _quantized(recipe: str):
    calib, _ = tiny_feeds()
    return graphopt.Pipeline([Quantize(**RECIPES[recipe])], log=_quiet).run(tiny_decoder("ort"), calib=calib).model


def _kernels(recipe: str, kernel_pass=EXACT):
    return kernel_pass.run(_quantized(recipe).copy(), PassContext(progress=False))


def _qdq_outputs(model, feeds):
    """The QDQ model as it reads (onnxruntime's basic level: no fusion into kernels of its own choosing)."""
    externals = {}
    session = ort_session(model.to_onnx(externals=externals), threads=1, optimization="basic", externals=externals)
    return [session.run(None, f) for f in feeds]


def _max_error(model, reference, feeds):
    session = model.session(threads=1)
    return max(float(np.abs(a - b).max()) for f, ref in zip(feeds, reference)
               for a, b in zip(session.run(None, f), ref))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_kernel_form_computes_what_the_qdq_form_does(recipe):
    _, feeds = tiny_feeds()
    result = _kernels(recipe)
    assert result.changed
    ops = collections.Counter(n.op for n in result.model.graph.nodes)
    for op, count in KERNELS[recipe].items():
        assert ops[op] == count  # 14 linears and the tied lm_head
    assert ops["MatMul"] == 0 and all(n.op != "DequantizeLinear" or not isinstance(n.inputs[0], gs.Constant)
                                      for n in result.model.graph.nodes)  # no weight left in QDQ form
    error = _max_error(result.model, _qdq_outputs(_quantized(recipe), feeds), feeds)
    assert error <= 2e-5, error  # logits and every present K/V: float accumulation order only


def _swapped_nibbles(values, bits):
    values = values.astype(np.uint8)
    return values if bits == 8 else (values[..., 1::2] | (values[..., 0::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("broken,recipe", [("swapped nibbles", "w4"), ("signed codes not shifted", "w8")])
def test_broken_layouts_fail_the_same_check(broken, recipe, monkeypatch):
    if broken == "swapped nibbles":
        monkeypatch.setattr(ort_layouts, "_pack", _swapped_nibbles)
    else:
        original = ort_layouts.nbits_weight
        monkeypatch.setattr("graphopt.passes.use_ort_kernels.nbits_weight",
                            lambda codes, *a, signed, **k: original(codes, *a, signed=False, **k))
    _, feeds = tiny_feeds()
    error = _max_error(_kernels(recipe).model, _qdq_outputs(_quantized(recipe), feeds), feeds)
    assert error > 2e-5


def _identity_product(node: gs.Node) -> np.ndarray:
    """What onnxruntime's own MatMulNBits kernel multiplies by: its output for A = I_K."""
    k = node.attrs["K"]
    inputs = [gs.Variable("A", np.float32, (k, k)), *node.inputs[1:]]
    graph = gs.Graph(nodes=[gs.Node("MatMulNBits", domain="com.microsoft", attrs=node.attrs, inputs=inputs,
                                    outputs=[gs.Variable("Y", np.float32, (k, node.attrs["N"]))])],
                     inputs=[inputs[0]], outputs=[], opset=21,
                     import_domains=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)])
    graph.outputs = [graph.nodes[0].outputs[0]]
    session = ort_session(gs.export_onnx(graph), threads=1, optimization="none")
    return session.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("recipe", ["w4", "w4a16", "w8"])
def test_both_forms_hold_the_same_dequantized_weights(recipe):
    qdq = _quantized(recipe)
    dequantized = {n.outputs[0].name: n for n in qdq.graph.nodes if n.op == "DequantizeLinear"
                   and isinstance(n.inputs[0], gs.Constant)}
    model = _kernels(recipe).model
    checked = 0
    for node in [n for n in model.graph.nodes if n.op == "MatMulNBits"]:
        name = node.inputs[1].name.removesuffix("_nbits")
        dq = dequantized[name]
        expected = ort_session(gs.export_onnx(gs.Graph(nodes=[dq], outputs=[dq.outputs[0]], opset=21)),
                               optimization="none").run(None, {})[0]
        zero_points = node.inputs[3].values if len(node.inputs) > 3 else None
        weight = ort_layouts.NBitsWeight(node.inputs[1].values, node.inputs[2].values, zero_points, node.attrs["K"],
                                         node.attrs["N"], node.attrs["bits"], node.attrs["block_size"])
        assert np.array_equal(ort_layouts.dequantize_nbits(weight), expected), name  # bit for bit
        if recipe == "w8":  # per-channel scales repeat over the widest block dividing K (fewest copies)
            assert node.attrs["block_size"] == min(256, node.attrs["K"] & -node.attrs["K"]) >= 16
        if checked < 3:  # onnxruntime's kernel agrees on the layout (the unpacker could mirror a packing bug)
            np.testing.assert_array_equal(_identity_product(node), expected)
        checked += 1
    assert checked == 15


def test_integer_matmuls_read_the_quantized_codes_themselves():
    qdq, model = _quantized("w8a8"), _kernels("w8a8").model
    codes = {t.name: t for t in qdq.graph.tensors().values() if isinstance(t, gs.Constant)}
    for node in [n for n in model.graph.nodes if n.op == "MatMulIntegerToFloat"]:
        weight = node.inputs[1]
        assert weight.name.endswith("_quantized") and np.array_equal(weight.values, codes[weight.name].values)
        assert node.inputs[0].inputs[0].op == "QuantizeLinear"  # the activation's codes, as calibrated


def test_fast_accuracy_level_is_close_but_not_exact():
    _, feeds = tiny_feeds()
    reference = _qdq_outputs(_quantized("w4"), feeds)
    fast = _kernels("w4", UseOrtKernels(accuracy_level_4bit=4, accuracy_level_8bit=4)).model
    levels = {n.attrs["accuracy_level"] for n in fast.graph.nodes if n.op == "MatMulNBits"}
    assert levels == {4}
    error = _max_error(fast, reference, feeds)
    assert 2e-5 < error < 0.5, error  # int8 activations inside the kernel: a small, real difference


def test_nothing_to_do_and_bad_options(tiny_onnx):
    result = UseOrtKernels().run(graphopt.lower(tiny_decoder("ort"), log=_quiet), PassContext(progress=False))
    assert not result.changed and "no MatMul or Gather" in result.stats["reason"]
    wide = graphopt.Pipeline([Quantize(weight_bits=8, activation_bits=0, int16_weights=["*"])], log=_quiet).run(
        tiny_onnx.copy()).model
    assert not UseOrtKernels().run(wide, PassContext(progress=False)).changed  # 16-bit codes have no kernel here
    with pytest.raises(OptionError, match="'accuracy_level_4bit'.*0 or 4"):
        UseOrtKernels(accuracy_level_4bit=2)
