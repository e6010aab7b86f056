"""nm_sparsity pass: patterns on every touched weight (ONNX and FX), skips, options, numerics, quantize."""

import numpy as np
import pytest

from graphopt import sparsity
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.evaluation import metrics
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.quant import numerics
from graphopt.quant.encodings import Encodings
from tests.fidelity import Bounds, lm_figures

NMSparsity = get_pass("nm_sparsity")
LAYER_WEIGHTS = 14  # tiny-llama: 2 layers x (q, k, v, o, gate, up, down); lm_head is skipped


@pytest.fixture(scope="module")
def tiny_calib():
    return [{"input_ids": w} for w in lm_windows(None, "calib", 4, 32)]


def _weights(model) -> dict[str, np.ndarray]:
    """Every 2-D weight as [out, in] (FX parameters; ONNX MatMul weights transposed)."""
    if model.form == "fx":
        return {n: p.detach().numpy().copy() for n, p in model.fx.named_parameters() if p.dim() == 2}
    return {t.name: np.asarray(t.values).T.copy() for t in model.graph.tensors().values()
            if hasattr(t, "values") and t.values.ndim == 2 and t.values.dtype == np.float32}


def _run(model, calib, **options):
    return NMSparsity(**options).run(model.copy(), PassContext(calib=calib, progress=False))


@pytest.mark.parametrize("form", ["onnx", "fx"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("text", ["2:4", "4:8"])
def test_pattern_holds_on_every_touched_weight(form, method, text, tiny_fx, tiny_onnx, tiny_calib):
    model = tiny_fx if form == "fx" else tiny_onnx
    before = _weights(model)
    result = _run(model, tiny_calib, pattern=text, method=method)
    n, m = map(int, text.split(":"))
    after = _weights(result.model)
    masks = result.model.meta.masks
    assert result.changed and len(masks) == LAYER_WEIGHTS == result.stats["layers_pruned"]
    for name, record in masks.items():
        assert record == {"pattern": text, "sparsity": pytest.approx(1 - n / m, abs=1e-3),
                          "axis": 1 if form == "fx" else 0, "method": method}
        assert sparsity.is_n_m(after[name], 1, n, m), name
        assert not sparsity.is_n_m(before[name], 1, n, m), name
    untouched = set(before) - set(masks)
    assert untouched and all(np.array_equal(before[k], after[k]) for k in untouched)
    np.testing.assert_array_equal(_weights(model)[next(iter(masks))], before[next(iter(masks))])  # input intact
    assert all(r["recon_error"] is not None and 0 < r["recon_error"] < 1 for r in result.stats["layers"])


def test_onnx_and_fx_prune_the_same_weights_and_compute_the_same(tiny_fx, tiny_onnx, tiny_calib):
    """Magnitude masks do not depend on calibration: both forms must give identical weights and logits."""
    fx = _run(tiny_fx, None, pattern="2:4", method="magnitude").model
    onnx = _run(tiny_onnx, None, pattern="2:4", method="magnitude").model
    wf, wo = _weights(fx), _weights(onnx)
    for name in fx.meta.masks:
        np.testing.assert_array_equal(wf[name], wo[name])
    feeds = tiny_calib[0]
    np.testing.assert_allclose(fx.run(feeds)[0], onnx.run(feeds)[0], atol=1e-4, rtol=1e-4)
    dense = tiny_onnx.run(feeds)[0]
    assert np.abs(onnx.run(feeds)[0] - dense).max() > 1e-3  # pruning did change the function


@pytest.mark.parametrize("form", ["onnx", "fx"])
def test_sequential_sparsegpt_reconstructs_better_than_magnitude(form, tiny_fx, tiny_onnx, tiny_calib):
    model = tiny_fx if form == "fx" else tiny_onnx
    errors = {m: _run(model, tiny_calib, pattern="unstructured", sparsity=0.5, method=m).stats["mean_recon_error"]
              for m in ("magnitude", "sparsegpt")}
    assert errors["sparsegpt"] < 0.45 * errors["magnitude"], errors  # 0.074 / 0.189 measured (ONNX)
    # one-shot (dense Hessians) agrees with sequential on the first block, where inputs are the
    # same; the two capture the Hessian through different runs, so a near tie may pick the other
    # weight of a group (18 of 4096 entries in the FX form, none in ONNX)
    seq = _run(model, tiny_calib, method="sparsegpt", sequential=True)
    one = _run(model, tiny_calib, method="sparsegpt", sequential=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.mean(~np.isclose(_weights(seq.model)[name], _weights(one.model)[name], rtol=0, atol=1e-4)) < 0.01


# the dense tiny Llama against itself pruned 2:4 by SparseGPT (calibration text), on 4 x 64
# evaluation bytes: 20.2 dB, overlap@1 0.75, ppl 9.07 (dense 8.52); by magnitude: 13.5 dB, ppl 11.2
SPARSEGPT_2_4 = Bounds(at_least={"sqnr_db": 19.5, "overlap@1": 0.72}, at_most={"ppl": 9.3})


def _shifted_masks(dense, pruned):
    """Broken variant: each weight keeps the dense values one place over inside its groups of 4
    (still 2:4, and the same count of zeros, but not the weights SparseGPT chose and updated)."""
    broken = dense.copy()
    tensors, chosen = broken.graph.tensors(), pruned.graph.tensors()
    for name in pruned.meta.masks:
        kept = (np.asarray(chosen[name].values) != 0).reshape(-1, 4, chosen[name].values.shape[1])
        tensors[name].values = np.asarray(tensors[name].values) * np.roll(kept, 1, axis=1).reshape(-1, kept.shape[2])
    return broken


def test_sparsegpt_2_4_keeps_the_tiny_llama_close(tiny_onnx, tiny_calib):
    windows = lm_windows(None, "eval", 4, 64)
    result = _run(tiny_onnx, tiny_calib, pattern="2:4", method="sparsegpt")
    assert not SPARSEGPT_2_4.misses(lm_figures(tiny_onnx, result.model, windows))
    magnitude = _run(tiny_onnx, None, pattern="2:4", method="magnitude").model
    assert SPARSEGPT_2_4.misses(lm_figures(tiny_onnx, magnitude, windows))
    shifted = _shifted_masks(tiny_onnx, result.model)
    assert all(sparsity.is_n_m(np.asarray(shifted.graph.tensors()[n].values), 0, 2, 4) for n in result.model.meta.masks)
    found = lm_figures(tiny_onnx, shifted, windows)
    assert SPARSEGPT_2_4.misses(found), found  # 6.1 dB, ppl 124


@pytest.mark.parametrize("form", ["onnx", "fx"])
def test_unstructured_scopes_and_overrides(form, tiny_fx, tiny_onnx, tiny_calib):
    model = tiny_fx if form == "fx" else tiny_onnx
    result = _run(model, tiny_calib, pattern="unstructured", sparsity=0.3, method="wanda",
                  overrides={"*mlp*": "4:8", "*v_proj*": 0.6})
    masks = result.model.meta.masks
    weights = _weights(result.model)
    for name, record in masks.items():
        if "mlp" in name:
            assert record["pattern"] == "4:8" and sparsity.is_n_m(weights[name], 1, 4, 8)
        else:
            target = 0.6 if "v_proj" in name else 0.3
            assert record["pattern"] == "unstructured" and record["sparsity"] == pytest.approx(target, abs=0.02)
    glob = _run(model, None, pattern="unstructured", sparsity=0.4, method="magnitude", scope="global")
    total = sum(weights[n].size for n in glob.model.meta.masks)
    zeros = sum((_weights(glob.model)[n] == 0).sum() for n in glob.model.meta.masks)
    assert zeros / total == pytest.approx(0.4, abs=1e-3)
    assert len({round(r["sparsity"], 3) for r in glob.stats["layers"]}) > 1  # ratios differ per layer


@pytest.mark.parametrize("form", ["onnx", "fx"])
def test_nothing_to_do_leaves_the_model_untouched(form, tiny_fx, tiny_onnx, tiny_calib):
    model = tiny_fx if form == "fx" else tiny_onnx
    before = _weights(model)
    for options in ({"skip": ["*"]}, {"skip": ["re:."]}, {"pattern": "unstructured", "sparsity": 0.0}):
        copy = model.copy()
        result = NMSparsity(**options).run(copy, PassContext(calib=tiny_calib, progress=False))
        assert not result.changed and result.model is copy and not copy.meta.masks
        assert all(np.array_equal(before[k], v) for k, v in _weights(copy).items())
    np.testing.assert_array_equal(model.run(tiny_calib[0])[0], copy.run(tiny_calib[0])[0])


def test_options_are_checked():
    for options, option in [({"pattern": "4:4"}, "pattern"), ({"pattern": "5:4"}, "pattern"),
                            ({"pattern": "two:four"}, "pattern"), ({"pattern": "unstructured", "sparsity": 1.0}, "sparsity"),
                            ({"sparsity": -0.1}, "sparsity"), ({"overrides": {"*": "3:2"}}, "overrides"),
                            ({"method": "obs"}, "method"), ({"scope": "global"}, "scope"),
                            ({"block_pattern": "("}, "block_pattern"), ({"dampening": 2.0}, "dampening")]:
        with pytest.raises(OptionError, match=option):
            NMSparsity(**options)
    with pytest.raises(OptionError, match="unknown option 'ratio'"):
        NMSparsity.from_options({"ratio": 0.5})


def test_calibrating_methods_need_calibration_and_fitting_shapes(tiny_onnx, tiny_fx):
    with pytest.raises(OptionError, match="nm_sparsity needs calibration"):
        NMSparsity(method="wanda").run(tiny_onnx.copy(), PassContext(calib=None))
    with pytest.raises(UnsupportedGraphError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'.*64.*multiple of 48"):
        NMSparsity(pattern="1:48", method="magnitude").run(tiny_fx.copy(), PassContext())


def test_masks_survive_quantize(tiny_onnx, tiny_calib):
    """issue 5: every N:M group of the quantized weights still satisfies N:M (int8 channel, int4 block)."""
    pruned = _run(tiny_onnx, tiny_calib, pattern="2:4", method="sparsegpt").model
    for options in ({"weight_bits": 8, "activation_bits": 0}, {"weight_bits": 4, "weight_granularity": "block",
                                                               "weight_block_size": 16, "activation_bits": 0}):
        quantized = get_pass("quantize")(**options).run(pruned.copy(), PassContext(calib=tiny_calib, progress=False)).model
        dqs = {n.outputs[0].name: n for n in quantized.graph.nodes if n.op == "DequantizeLinear"}
        for name, record in pruned.meta.masks.items():
            codes = np.asarray(dqs[name].inputs[0].values).astype(np.int32)
            encoding = Encodings.from_meta(quantized.meta.encodings)[name]
            zero_point = numerics.expand_param(encoding.params(codes.shape)[1], codes.shape, encoding.spec)
            # asymmetric weights keep pruned entries at the zero point, which dequantizes to exactly 0
            assert sparsity.is_n_m(codes - np.asarray(zero_point, np.int32), record["axis"], 2, 4), (options, name)
            assert name in quantized.meta.masks


@pytest.mark.real
def test_sparsegpt_on_smollm2_first_block(smollm2_onnx, smollm2_calib, smollm2_eval):
    """SparseGPT 2:4 on layer 0 of SmolLM2 (real calibration): patterns hold, outputs stay close."""
    keep_only = ["re:^(?!model\\.layers\\.0\\.)"]
    result = _run(smollm2_onnx, smollm2_calib, pattern="2:4", method="sparsegpt", skip=keep_only)
    masks = result.model.meta.masks
    assert len(masks) == 7 and "note" not in result.stats
    tensors = result.model.graph.tensors()
    for name in masks:
        assert sparsity.is_n_m(np.asarray(tensors[name].values), 0, 2, 4), name
    # measured: recon error at most 0.144, cosine 0.9878, ppl 1.142x dense; magnitude 2:4 on the
    # same layer (no reconstruction) misses all three: cosine 0.971, ppl 1.62x
    assert max(r["recon_error"] for r in result.stats["layers"]) < 0.16
    dense, _ = evaluate_causal_lm(smollm2_onnx, smollm2_eval[:2])
    pruned = result.model.run({"input_ids": smollm2_eval[0]})[0]
    reference = smollm2_onnx.run({"input_ids": smollm2_eval[0]})[0]
    assert metrics.cosine(pruned, reference) > 0.985
    row, _ = evaluate_causal_lm(result.model, smollm2_eval[:2])
    assert row["ppl"] < 1.16 * dense["ppl"]
