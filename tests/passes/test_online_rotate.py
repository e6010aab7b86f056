"""online_rotate: exact in float (the same graph without the fold into the weights is not), what
quantize makes of it, decoders of both forms, its errors."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt.analysis.linear_sites import ONLINE_ROTATION, linear_sites
from graphopt.errors import OptionError
from graphopt.evaluation.generation import Generator
from graphopt.frontends.corpora import lm_windows
from graphopt.passes import OnlineRotate, Quantize
from graphopt.pipeline.passes import PassContext
from tests.decoding import PROMPT, assert_steps_match, hf_step_logits, tiny_decoder, tiny_hf

TOLERANCE = 1e-5  # of the largest output value


def _quiet(*_):
    pass


def _outputs(model, windows):
    return [model.run({"input_ids": w})[0] for w in windows]


def _worst(before, after) -> float:
    return max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(before, after))


def test_rotation_is_exact_in_float(tiny_onnx):
    """Both down_projs (128 input rows) get blocks of 16; the function is unchanged. The rotation
    without its transpose folded into the weights changes it."""
    windows = lm_windows(None, "eval", 2, 64)
    reference = _outputs(tiny_onnx, windows)
    result = OnlineRotate(block=16).run(tiny_onnx.copy(), PassContext(progress=False))
    assert result.changed and result.stats == {"rotated_inputs": 2, "weights": 2, "block": 16}
    ops = [n.op for n in result.model.graph.nodes]
    assert ops.count("MatMul") == sum(n.op == "MatMul" for n in tiny_onnx.graph.nodes) + 2
    assert _worst(reference, _outputs(result.model, windows)) < TOLERANCE

    unfolded = result.model.copy()
    tensors = unfolded.graph.tensors()
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        tensors[name].values = np.asarray(tiny_onnx.graph.tensors()[name].values)
    assert _worst(reference, _outputs(unfolded, windows)) > 0.01


def test_inputs_the_block_does_not_divide_are_padded_with_zeros(tiny_onnx):
    """down_proj's 128 input rows at blocks of 256: the input is padded with 128 zeros at its end, the
    weight gets 128 rows (of Hᵀ's mixing, no longer zero), and the function is unchanged; the zeros
    put in front of the input instead change it."""
    windows = lm_windows(None, "eval", 2, 64)
    reference = _outputs(tiny_onnx, windows)
    result = OnlineRotate(block=256).run(tiny_onnx.copy(), PassContext(progress=False))
    tensors = result.model.graph.tensors()
    assert tensors["model.layers.0.mlp.down_proj.weight"].values.shape == (256, 64)
    pads = [n for n in result.model.graph.nodes if n.op == "Pad"]
    assert len(pads) == 2 and _worst(reference, _outputs(result.model, windows)) < TOLERANCE
    leading = result.model.copy()
    for pad in [n for n in leading.graph.nodes if n.op == "Pad"]:
        pad.inputs[1] = gs.Constant(f"{pad.name}.leading", np.array([128, 0], np.int64))
    assert _worst(reference, _outputs(leading, windows)) > 0.01


def test_a_second_run_stays_exact(tiny_onnx):
    """Rotating again (another recipe step, here with other signs) stays exact: each (block, seed)
    has its matrix under a name of its own, and the saved model passes onnx's checker."""
    import onnx

    windows = lm_windows(None, "eval", 1, 64)
    once = OnlineRotate(block=16).run(tiny_onnx.copy(), PassContext(progress=False)).model
    twice = OnlineRotate(block=16, seed=1).run(once, PassContext(progress=False)).model
    assert _worst(_outputs(tiny_onnx, windows), _outputs(twice, windows)) < TOLERANCE
    proto = twice.to_onnx()
    names = [t.name for t in proto.graph.initializer]
    assert len(names) == len(set(names))
    onnx.checker.check_model(proto)


def test_quantize_keeps_the_rotation_float_and_quantizes_its_output(tiny_onnx, tiny_calib):
    """The rotation is no linear site: quantize neither quantizes H nor its input; the down_proj
    input (H's output) is an activation point like before, and fidelity is not worse for it."""
    rotated = OnlineRotate(block=16).run(tiny_onnx.copy(), PassContext(progress=False)).model
    assert not [s for s in linear_sites(rotated) if s.weight.startswith(ONLINE_ROTATION)]
    options = dict(weight_bits=8, activation_bits=8, observer="mse")
    quantized = Quantize(**options).run(rotated, tiny_calib).model
    graph = quantized.graph
    tensors = graph.tensors()
    assert tensors[f"{ONLINE_ROTATION}.16"].values.dtype == np.float32
    turns = [n for n in graph.nodes if n.op == "MatMul" and n.inputs[1].name == f"{ONLINE_ROTATION}.16"]
    assert len(turns) == 2
    for turn in turns:
        assert turn.inputs[0].inputs[0].op == "Reshape"                       # float, straight from x
        join = turn.outputs[0].outputs[0]
        assert [n.op for n in join.outputs[0].outputs] == ["QuantizeLinear"]  # the down_proj input point


@pytest.mark.parametrize("block", [16, 256])  # 256: the input padded to whole blocks
def test_decoders_keep_every_decode_step(block):
    """The ort form (one graph, dynamic shapes) and the portable form (static prefill and decode
    graphs specialised from it) both carry the rotation and match transformers step by step."""
    logits, fed = hf_step_logits(tiny_hf(), PROMPT, 4)
    for form in ("ort", "portable"):
        result = graphopt.Pipeline([OnlineRotate(block=block)], log=_quiet, progress=False).run(tiny_decoder(form))
        assert result.report.steps[-1].changed
        assert_steps_match(Generator.load(result.model, threads=1, log=_quiet).start(64), PROMPT, fed, logits)


@pytest.mark.parametrize("options, message", [
    ({"block": 24}, "'block' must be a power of two"),
    ({"weights": ()}, "names no linear"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        OnlineRotate(**options).check()


@pytest.mark.parametrize("options, message", [
    ({"weights": ("*no_such*",)}, "'\\*no_such\\*' matches no MatMul linear"),
])
def test_unfit_weights_are_refused_before_any_change(tiny_onnx, options, message):
    model = tiny_onnx.copy()
    before = [n.op for n in model.graph.nodes]
    with pytest.raises(OptionError, match=message):
        OnlineRotate(**options).run(model, PassContext(progress=False))
    assert [n.op for n in model.graph.nodes] == before
