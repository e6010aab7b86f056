"""rotate: the rotated model computes the same logits (tiny Llama with distinct γs, SmolLM2), the
tied table stays one tensor, refusals leave the model untouched; on SmolLM2 the rotation is what
lets 8-bit activations through."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.analysis.residual import find_residual_stream
from graphopt.evaluation import metrics
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext

Rotate = get_pass("rotate")


@pytest.fixture(scope="module")
def tiny_with_gammas(tiny_onnx):
    """The tiny Llama's norms share one all-ones γ; give each its own random γ so folding is tested."""
    model = tiny_onnx.copy()
    rng = np.random.default_rng(0)
    nodes = {n.name: n for n in model.graph.nodes}
    for norm in find_residual_stream(model).norms:
        node = nodes[norm.gamma_node]
        i = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
        node.inputs[i] = gs.Constant(f"{node.name}.gamma", rng.uniform(0.3, 3.0, 64).astype(np.float32))
    return model


def logits(model, windows):
    run = model.runner()
    return [run({"input_ids": w})[0] for w in windows]


def test_tiny_logits_unchanged(tiny_with_gammas):
    windows = [np.random.default_rng(1).integers(0, 256, (2, 48))]
    before = logits(tiny_with_gammas, windows)
    result = Rotate().run(tiny_with_gammas.copy(), PassContext())
    assert result.changed
    assert result.stats == {"width": 64, "tables": 1, "writers": 4, "norms": 5, "gamma_matmuls": 1}
    after = logits(result.model, windows)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=2e-4 * np.abs(before[0]).max())
    graph = result.model.graph
    # one table still serves lookup and lm_head; the final γ became a 64 x 64 MatMul
    assert sum(t.name == "lm_head.weight.T" for n in graph.nodes for t in n.inputs) == 2
    mixer = [n for n in graph.nodes if n.op == "MatMul" and n.inputs[1].name.endswith(".rotated_gain")]
    assert len(mixer) == 1 and mixer[0].inputs[1].values.shape == (64, 64)
    gammas = [t for n in graph.nodes if n.op == "Mul" for t in n.inputs
              if isinstance(t, gs.Constant) and t.values.shape == (64,)]
    assert len(gammas) == 4 and all(np.all(g.values == 1) for g in gammas)


def test_different_seeds_are_different_rotations_of_the_same_function(tiny_with_gammas):
    windows = [np.random.default_rng(2).integers(0, 256, (1, 32))]
    a = Rotate(seed=1).run(tiny_with_gammas.copy(), PassContext()).model
    b = Rotate(seed=2).run(tiny_with_gammas.copy(), PassContext()).model
    wa, wb = (m.graph.tensors()["model.layers.0.mlp.down_proj.weight"].values for m in (a, b))
    assert not np.allclose(wa, wb)
    np.testing.assert_allclose(logits(a, windows)[0], logits(b, windows)[0], atol=1e-3)


def test_fx_form_rotates_the_parameters_and_lowers_to_the_same_logits(tiny_fx):
    """The FX form (for QAT): torch logits unchanged, the tied table one parameter, the final γ a
    linear whose weight lowers under the name the ONNX form gives it."""
    import torch

    import graphopt

    model = tiny_fx.copy()
    rng = np.random.default_rng(0)
    for name, param in list(model.fx.named_parameters()):
        if name.endswith("norm.weight"):
            owner, _, attr = name.rpartition(".")
            setattr(model.fx.get_submodule(owner), attr,
                    torch.nn.Parameter(torch.from_numpy(rng.uniform(0.3, 3.0, 64).astype(np.float32))))
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 40)))
    def run(module):
        with torch.no_grad():
            out = module(ids)
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

    before = run(model.fx)
    result = Rotate().run(model, PassContext())
    assert result.changed and result.stats["gamma_matmuls"] == 1 and result.stats["writers"] == 4
    after = run(result.model.fx)
    np.testing.assert_allclose(after, before, atol=2e-4 * np.abs(before).max())
    gm = result.model.fx
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")
    assert all(np.all(p.detach().numpy() == 1) for n, p in gm.named_parameters() if n.endswith("norm.weight"))
    lowered = graphopt.lower(result.model, log=lambda _: None)
    assert "model.norm.rotated_gain" in lowered.graph.tensors()
    np.testing.assert_allclose(lowered.runner()({"input_ids": ids.numpy()})[0], before, atol=2e-4 * np.abs(before).max())


def test_refusals_leave_the_model_untouched(tiny_onnx):
    masked = tiny_onnx.copy()
    masked.meta.masks["model.layers.0.mlp.down_proj.weight"] = {"pattern": "2:4"}
    result = Rotate().run(masked, PassContext())
    assert not result.changed and "sparsity mask" in result.stats["reason"]
    exposed = tiny_onnx.copy()
    exposed.graph.outputs.append(exposed.graph.tensors()["add_388"])
    result = Rotate().run(exposed, PassContext())
    assert not result.changed and "'add_388' is a graph output" in result.stats["reason"]


@pytest.mark.real
def test_smollm2_rotation_is_exact_and_lets_8_bit_activations_through(smollm2_onnx, smollm2_calib, smollm2_eval):
    """Float logits agree; with 16-bit weights, down_proj inputs at 16 bits (the rotation does
    not reach them) and every other activation at 8 bits, the rotated model keeps more signal."""
    rotated = Rotate().run(smollm2_onnx.copy(), PassContext()).model
    before, after = logits(smollm2_onnx, smollm2_eval[:2]), logits(rotated, smollm2_eval[:2])
    for b, a in zip(before, after):
        assert metrics.sqnr_db(b, a) > 60 and np.array_equal(b.argmax(-1), a.argmax(-1))
    quantize = get_pass("quantize")(weight_bits=16, activation_bits=8, observer="mse", int16_inputs=("*.mlp.down_proj.weight",))
    ctx = PassContext(calib=smollm2_calib, progress=False)
    plain = quantize.run(smollm2_onnx.copy(), ctx).model
    turned = quantize.run(rotated.copy(), ctx).model
    sqnr = [np.mean([metrics.sqnr_db(b, q) for b, q in zip(before, logits(m, smollm2_eval[:2]))]) for m in (plain, turned)]
    assert sqnr[1] > sqnr[0] + 3, sqnr


def test_gain_matrices_are_found_in_both_forms(tiny_fx, tiny_onnx):
    import graphopt
    from graphopt.passes.rotate import gain_matrices

    assert gain_matrices(tiny_fx) == () and gain_matrices(tiny_onnx) == ()
    rotated = Rotate().run(tiny_fx.copy(), PassContext()).model
    assert gain_matrices(rotated) == ("model.norm.rotated_gain",)
    assert gain_matrices(graphopt.lower(rotated, log=lambda _: None)) == ("model.norm.rotated_gain",)
