"""graphopt.sparsity: masks, patterns, SparseGPT numerics on synthetic and real SmolLM2 activations."""

import numpy as np
import pytest

from graphopt import sparsity
from graphopt.analysis.capture import InputHessian, capture
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir.names import name_matches


def _layer(seed=0, out=32, inp=64, rows=512):
    """A weight and correlated activations (so the Hessian is far from diagonal, as in real layers)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(inp, inp)) / np.sqrt(inp)
    x = rng.normal(size=(rows, inp)) @ mix + rng.normal(size=inp)
    w = rng.normal(size=(out, inp)).astype(np.float32)
    h = InputHessian()
    h.update(x)
    return w, x, h.hessian


def test_parse_pattern():
    assert sparsity.parse_pattern("2:4") == sparsity.Pattern(2, 4)
    assert sparsity.parse_pattern("unstructured", 0.3).target == pytest.approx(0.3)
    assert sparsity.parse_pattern(0.25).label == "unstructured"
    for bad in ("4:4", "5:4", "2-4", "0:0"):
        with pytest.raises(OptionError, match="pattern"):
            sparsity.parse_pattern(bad)
    with pytest.raises(OptionError, match=r"\[0, 1\)"):
        sparsity.parse_pattern("unstructured", 1.0)


def test_nm_mask_keeps_largest_n_of_each_group():
    scores = np.array([[1, 4, 3, 2, 8, 7, 6, 5]], dtype=float)
    keep = sparsity.nm_mask(scores, 2, 4)
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(UnsupportedGraphError, match="multiple of 4"):
        sparsity.nm_mask(np.ones((2, 6)), 2, 4)


def test_unstructured_mask_per_row_and_layer():
    scores = np.arange(40, dtype=float).reshape(4, 10)
    row = sparsity.unstructured_mask(scores, 0.3, "row")
    assert (row.sum(1) == 7).all() and not row[:, :3].any()
    layer = sparsity.unstructured_mask(scores, 0.5, "layer")
    assert layer.sum() == 20 and not layer[:2].any()
    assert sparsity.unstructured_mask(scores, 0.0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("text", ["2:4", "4:8", "1:4"])
def test_every_method_meets_the_pattern(method, text):
    w, _, h = _layer()
    pattern = sparsity.parse_pattern(text)
    new, keep = sparsity.prune(w, pattern, method, hessian=h)
    assert sparsity.is_n_m(new, 1, pattern.n, pattern.m)
    assert not sparsity.is_n_m(w, 1, pattern.n, pattern.m)
    sparsity.check_pattern(new, pattern, 1, "w", keep)
    assert sparsity.sparsity_of(new) == pytest.approx(pattern.target, abs=1e-3)


def test_check_pattern_names_the_weight():
    w = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(UnsupportedGraphError, match="'layer.w' violates 2:4"):
        sparsity.check_pattern(w, sparsity.Pattern(2, 4), 1, "layer.w")


def test_magnitude_keeps_kept_weights_exactly():
    w, _, _ = _layer()
    new, keep = sparsity.prune(w, sparsity.Pattern(2, 4), "magnitude")
    np.testing.assert_array_equal(new[keep], w[keep])


def test_zero_ratio_is_identity():
    w, _, h = _layer()
    for method in ("magnitude", "wanda", "sparsegpt"):
        new, keep = sparsity.prune(w, sparsity.Pattern(ratio=0.0), method, hessian=h)
        np.testing.assert_array_equal(new, w)
        assert keep.all()


def test_reconstruction_error_matches_activations():
    w, x, h = _layer()
    new, _ = sparsity.prune(w, sparsity.Pattern(2, 4), "magnitude")
    direct = np.linalg.norm(x @ w.T - x @ new.T) / np.linalg.norm(x @ w.T)
    assert sparsity.reconstruction_error(w, new, h) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("text", ["2:4", "unstructured"])
def test_sparsegpt_beats_wanda_beats_magnitude(text):
    w, _, h = _layer(seed=1)
    pattern = sparsity.parse_pattern(text, 0.5)
    err = {m: sparsity.reconstruction_error(w, sparsity.prune(w, pattern, m, hessian=h, blocksize=16)[0], h)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["sparsegpt"] < 0.8 * err["wanda"] and err["wanda"] <= err["magnitude"] * 1.05


def test_sparsegpt_rejects_a_hessian_of_the_wrong_size():
    w, _, h = _layer()
    with pytest.raises(UnsupportedGraphError, match="does not fit"):
        sparsity.sparsegpt(w, h[:8, :8], sparsity.Pattern(2, 4))


def test_global_threshold_and_name_matches():
    assert sparsity.global_threshold([np.arange(10.0), np.arange(10.0, 20.0)], 0.25) == 4.0
    assert name_matches("lm_head.weight.T", ("lm_head*",))
    assert name_matches("model.layers.3.mlp.up_proj.weight", ("re:layers\\.3\\.mlp",))
    assert not name_matches("model.layers.13.mlp.up_proj.weight", ("re:layers\\.3\\.mlp",))


@pytest.mark.real
def test_sparsegpt_beats_magnitude_on_a_real_smollm2_layer(smollm2_onnx, smollm2_calib):
    """Layer 2's q_proj and down_proj with their real calibration activations (4 x 64 tokens)."""
    sites = {s.weight: s for s in linear_sites(smollm2_onnx)}
    tensors = smollm2_onnx.graph.tensors()
    names = ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    acts = [sites[n].activation for n in names]
    hessians = capture(smollm2_onnx, smollm2_calib, acts, lambda _: InputHessian(),
                                   progress=False)
    for name, act in zip(names, acts):
        w = sparsity.to_canonical(np.asarray(tensors[name].values, dtype=np.float32), 0)
        h = hessians[act].hessian
        errs = {}
        for method in ("magnitude", "sparsegpt"):
            new, keep = sparsity.prune(w, sparsity.Pattern(2, 4), method, hessian=h)
            sparsity.check_pattern(new, sparsity.Pattern(2, 4), 1, name, keep)
            errs[method] = sparsity.reconstruction_error(w, new, h)
        assert errs["sparsegpt"] < 0.26 * errs["magnitude"], (name, errs)  # 0.235 (q_proj), 0.171 (down_proj)
