"""use_ort_kernels: QDQ weights become MatMulNBits / MatMulIntegerToFloat with the same codes, and outputs agree."""

import collections
import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.ir.runtime import ort_session
from graphopt.passes import FuseOrtOps, Quantize, UseOrtKernels, use_ort_kernels
from graphopt.pipeline.passes import PassContext
from graphopt.quant import numerics, ort_layouts
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.qdq import apply_encodings
from graphopt.quant.spec import QuantSpec
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


# ------------------------------------------------------------------ block tables (rule 3) and split inputs (rule 4)
def _block_encoding(name: str, table: np.ndarray, block: int | None, symmetric: bool = True, bits: int = 8):
    """A `bits` encoding of a [k, n] MatMul weight (signed symmetric, or unsigned min/max), per block of
    `block` along k or per column."""
    k, n = table.shape
    dtype = f"{'' if symmetric else 'u'}int{bits}"
    if block is None:
        spec, groups = QuantSpec(dtype, "channel", axis=1, symmetric=symmetric), table[None]
    else:  # a shorter last block when block does not divide k (to_blocks repeats its last row: its own range)
        spec = QuantSpec(dtype, "block", axis=0, block_size=block, symmetric=symmetric)
        groups = numerics.to_blocks(table, 0, block)
    lo, hi = np.minimum(groups.min(-2), 0), np.maximum(groups.max(-2), 0)
    if symmetric:
        scale, zero = np.maximum(-lo, hi) / (2 ** (bits - 1) - 1), np.zeros(lo.shape, np.int64)
    else:
        scale = (hi - lo) / (2 ** bits - 1)
        zero = np.round(-lo / scale).astype(np.int64)
    if block is None:
        scale, zero = scale[0], zero[0]
    return Encoding.from_params(name, scale.astype(np.float32), zero, spec)


def _table_model(k: int, n: int, *, block: int | None = 32, lookup: bool = True, rank: int = 3, seed: int = 0,
                 symmetric: bool = True, bits: int = 8):
    """A [k, n] table `table` read by MatMul(x [..., k]) -> y and, with `lookup`, by Gather(axis=1,
    ids) -> rows; quantized to `bits` per block of `block` along k (None: per output channel)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    table = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.2, 2.0, (k, 1)).astype(np.float32)
    batch = ["b", "s"][3 - rank:]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, n])]
    nodes = [helper.make_node("MatMul", ["x", "table"], ["y"], name="head")]
    if lookup:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, [k, "b", "s"]))
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=1))
    graph = helper.make_graph(nodes, "table", inputs, outputs, [onnx.numpy_helper.from_array(table, "table")])
    model = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    apply_encodings(model.graph, Encodings(params={"table": _block_encoding("table", table, block, symmetric, bits)}))
    return model


def _activations(rows: int, k: int, seed: int = 1) -> np.ndarray:
    """Activations with a few outlier channels, as a transformer's hidden state has."""
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    x[:, [3, k // 3, k - 5]] *= 60
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [96, 72])  # 72: the kernel's K padded to whole blocks, the lookups cut back to 72
@pytest.mark.parametrize("symmetric", [True, False])  # the kernel's default zero points, or its own (looked up too)
def test_block_table_is_held_once_and_looked_up_exactly(symmetric, k, bits):
    n = 200
    qdq = _table_model(k, n, symmetric=symmetric, bits=bits)
    result = EXACT.run(qdq.copy(), PassContext(progress=False))
    ops = collections.Counter(node.op for node in result.model.graph.nodes)
    assert result.changed and ops["MatMulNBits"] == 1 and ops["DequantizeLinear"] == 0 and ops["MatMul"] == 0
    tables = [t for t in result.model.graph.tensors().values()
              if isinstance(t, gs.Constant) and t.values.size >= k * n * bits // 8]
    assert len(tables) == 1 and tables[0].values.dtype == np.uint8  # the kernel's B, read by the lookup too
    kernel = next(node for node in result.model.graph.nodes if node.op == "MatMulNBits")
    assert kernel.attrs["block_size"] == 32 and kernel.attrs["bits"] == bits and len(kernel.inputs) == 4 - symmetric
    scales = kernel.inputs[2].values
    assert not np.allclose(scales[:, :1], scales)  # scales differ per block: a scale per row would fail below
    feeds = [{"x": _activations(6, k).reshape(2, 3, k), "ids": np.array([[0, 5, n - 1], [7, 7, 2]], np.int64)}]
    (y, rows), = [result.model.session(threads=1).run(None, f) for f in feeds]
    (qdq_y, qdq_rows), = _qdq_outputs(qdq, feeds)
    assert np.array_equal(rows, qdq_rows)  # bit for bit: the DequantizeLinear's values
    assert np.abs(y - qdq_y).max() <= 1e-5 * np.abs(qdq_y).max()
    kernel.inputs[2].values = np.repeat(scales.mean(1, keepdims=True), scales.shape[1], 1)  # one scale per row
    assert not np.array_equal(result.model.session(threads=1).run(None, feeds[0])[1], qdq_rows)


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("axis", [0, 1])  # an untied embedding [V, H] in blocks along H; a table [H, V] looked up along V
def test_untied_block_tables_look_up_rows_not_the_whole_table(axis, bits, symmetric):
    """A table read only by a Gather, in blocks (of 32, the last of 8: H = 72) along the axis the lookup
    keeps: the rows' codes and block parameters are gathered, never the table dequantized whole, and
    the rows are the DequantizeLinear's bit for bit. A block index off by one element is not."""
    from onnx import TensorProto, helper

    hidden, vocab = 72, 50
    rng = np.random.default_rng(3)
    table = rng.standard_normal((vocab, hidden) if axis == 0 else (hidden, vocab)).astype(np.float32)
    spec = QuantSpec(f"{'' if symmetric else 'u'}int{bits}", "block", axis=1 - axis, block_size=32, symmetric=symmetric)
    scale, zero = numerics.params_for(table, spec)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=axis)], "t",
                              [ids], [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(table, "table")])
    qdq = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    apply_encodings(qdq.graph, Encodings(params={"table": Encoding.from_params("table", scale, zero, spec)}))
    result = EXACT.run(qdq.copy(), PassContext(progress=False))
    ops = collections.Counter(node.op for node in result.model.graph.nodes)
    feeds = [{"ids": np.array([[0, 5, vocab - 1], [7, 7, 2]], np.int64)}]
    (expected,), = _qdq_outputs(qdq, feeds)
    assert result.stats["gathered_tables"] == 1 and ops["DequantizeLinear"] == 0
    (rows,) = result.model.session(threads=1).run(None, feeds[0])
    assert rows.shape == expected.shape and np.array_equal(rows, expected)
    if bits == 4:  # onnxruntime's Gather takes no 4-bit codes: GatherBlockQuantized reads them and their blocks
        lookup, = [node for node in result.model.graph.nodes if node.op == "GatherBlockQuantized"]
        scales = lookup.inputs[2]
        scales.values = np.flip(scales.values, axis=lookup.attrs["quantize_axis"]).copy()  # blocks in reverse order
        assert not np.array_equal(result.model.session(threads=1).run(None, feeds[0])[0], expected)
        return
    index = next(t for t in result.model.graph.tensors().values() if t.name.endswith("_element_blocks"))
    index.values = np.minimum(index.values + (np.arange(hidden) % 32 == 31), 2)  # each block's last element: the next block's
    assert not np.array_equal(result.model.session(threads=1).run(None, feeds[0])[0], expected)


def _product_errors(model, feeds: list[dict], exact: list[np.ndarray]) -> float:
    """Largest relative RMS error of the kernel model's y against the exact products."""
    session = model.session(threads=1)
    return max(float(np.sqrt(np.mean((session.run(None, f)[0] - e) ** 2) / np.mean(e ** 2)))
               for f, e in zip(feeds, exact))


@pytest.mark.parametrize("block", [32, None])  # per-channel weights: MatMulNBits blocks of 64 (K = 576)
@pytest.mark.parametrize("rank, k", [(2, 576), (3, 576), (3, 584)])  # 584: a last block of 8 (24 per channel)
def test_split_input_cancels_the_kernels_int8_rounding(block, rank, k, monkeypatch):
    n = 256
    qdq = _table_model(k, n, block=block, lookup=False, rank=rank)
    dq = next(node for node in qdq.graph.nodes if node.op == "DequantizeLinear")
    weight = ort_session(gs.export_onnx(gs.Graph(nodes=[dq], outputs=[dq.outputs[0]], opset=21)),
                         optimization="none").run(None, {})[0].astype(np.float64)
    shapes = [(1, 128, k), (1, 1, k)] if rank == 3 else [(128, k), (1, k)]  # a prefill chunk and a decode step
    feeds = [{"x": _activations(int(np.prod(s[:-1])), k, seed=i).reshape(s)} for i, s in enumerate(shapes)]
    exact = [f["x"].astype(np.float64) @ weight for f in feeds]
    fast = UseOrtKernels(accuracy_level_8bit=4)
    plain = fast.run(qdq.copy(), PassContext(progress=False))
    split = UseOrtKernels(accuracy_level_8bit=4, split_inputs=("tab*",)).run(qdq.copy(), PassContext(progress=False))
    assert split.stats["split_inputs"] == 1 and plain.stats["split_inputs"] == 0
    assert collections.Counter(node.op for node in split.model.graph.nodes)["MatMulNBits"] == 1
    plain_error, split_error = (_product_errors(m.model, feeds, exact) for m in (plain, split))
    assert split_error * 10 <= plain_error, (split_error, plain_error)
    # broken: the residual rounded in blocks other than the kernel's leaves the kernel's own rounding in place
    original = use_ort_kernels._split_input

    def other_blocks(kernel):
        kernel.attrs["block_size"] //= 2
        nodes = original(kernel)
        kernel.attrs["block_size"] *= 2
        return nodes

    monkeypatch.setattr(use_ort_kernels, "_split_input", other_blocks)
    broken = UseOrtKernels(accuracy_level_8bit=4, split_inputs=("table",)).run(qdq.copy(), PassContext(progress=False))
    assert _product_errors(broken.model, feeds, exact) * 10 > plain_error


def test_split_inputs_name_weights_of_kernels():
    qdq = _table_model(64, 32, lookup=False)
    with pytest.raises(OptionError, match="'split_inputs'.*'lm_head\\*' matches no weight"):
        UseOrtKernels(split_inputs=("lm_head*",)).run(qdq.copy(), PassContext(progress=False))
    # an exact kernel (float inputs) needs no split: matched, left as it is (an untied 4-bit lm_head in a recipe
    # that splits the tied 8-bit one's input)
    exact = UseOrtKernels(accuracy_level_8bit=0, split_inputs=("table",)).run(qdq.copy(), PassContext(progress=False))
    assert exact.stats["MatMulNBits"] == 1 and exact.stats["split_inputs"] == 0


def test_split_tied_lm_head_of_a_decoder_then_fused_ops():
    """The tiny Llama's tied table [64, 256] in int8 blocks of 32: one MatMulNBits (split input) and the
    embedding lookup read the same codes, and fuse_ort_ops still fuses around them."""
    qdq = graphopt.lower(tiny_decoder("ort"), log=_quiet)
    table = qdq.graph.tensors()["lm_head.weight.T"].values
    apply_encodings(qdq.graph, Encodings(params={"lm_head.weight.T": _block_encoding("lm_head.weight.T", table, 32)}))
    _, feeds = tiny_feeds()
    reference = [outputs[:1] for outputs in _qdq_outputs(qdq, feeds)]  # the logits
    errors = {}
    for split in ((), ("lm_head*",)):
        kernels = UseOrtKernels(split_inputs=split).run(qdq.copy(), PassContext(progress=False))
        assert kernels.stats["MatMulNBits"] == kernels.stats["gathered_tables"] == 1
        fused = FuseOrtOps().run(kernels.model, PassContext(progress=False))
        assert fused.stats["SkipSimplifiedLayerNormalization"] == 4  # the final norm too, read by the split
        session = fused.model.session(threads=1)
        errors[split] = max(float(np.abs(session.run(None, f)[0] - ref[0]).max()) for f, ref in zip(feeds, reference))
    assert errors[("lm_head*",)] <= 1e-3 < errors[()] / 10, errors  # logits of magnitude ~10
