"""rotate: the rotated model computes the same logits (tiny Llama, SmolLM2), the
tied table stays one tensor, refusals leave the model untouched; on SmolLM2 the rotation is what
lets 8-bit activations through."""

import sys

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from graphopt.evaluation import metrics
from graphopt.evaluation.metrics import compare_outputs
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.quant.rotation import rotation
from tests.fidelity import Bounds

Rotate = get_pass("rotate")


# SQNR of the rotated model's logits against the unrotated model's: 128.6 dB measured (float32
# rounding), both forms; the pass guarantees ~1e-5 relative, which is ~100 dB
EXACT = Bounds(at_least={"sqnr_db": 120.0})


def logits(model, windows):
    run = model.runner()
    return [run({"input_ids": w})[0] for w in windows]


def fx_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.fx(torch.from_numpy(ids))
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def unnormalised_hadamard(monkeypatch):
    """Broken variant: the pass's R without its 1/sqrt(n) (entries ±1, R·Rᵀ = n·I)."""
    module = sys.modules[Rotate.__module__]
    monkeypatch.setattr(module, "rotation", lambda width, seed: rotation(width, seed) * np.sqrt(width))


def test_tiny_logits_unchanged(tiny_onnx, monkeypatch):
    """The trained tiny Llama's five norms each carry their own γ, so folding them is tested."""
    windows = [np.random.default_rng(1).integers(0, 256, (2, 48))]
    before = logits(tiny_onnx, windows)
    result = Rotate().run(tiny_onnx.copy(), PassContext())
    assert result.changed
    assert result.stats == {"width": 64, "tables": 1, "writers": 4, "norms": 5, "gamma_matmuls": 1}
    assert not EXACT.misses(compare_outputs(before, logits(result.model, windows), "causal-lm"))
    graph = result.model.graph
    # one table still serves lookup and lm_head; the final γ became a 64 x 64 MatMul
    assert sum(t.name == "lm_head.weight.T" for n in graph.nodes for t in n.inputs) == 2
    mixer = [n for n in graph.nodes if n.op == "MatMul" and n.inputs[1].name.endswith(".rotated_gain")]
    assert len(mixer) == 1 and mixer[0].inputs[1].values.shape == (64, 64)
    gammas = [t for n in graph.nodes if n.op == "Mul" for t in n.inputs
              if isinstance(t, gs.Constant) and t.values.shape == (64,)]
    assert len(gammas) == 4 and all(np.all(g.values == 1) for g in gammas)
    unnormalised_hadamard(monkeypatch)
    broken = Rotate().run(tiny_onnx.copy(), PassContext()).model
    assert EXACT.misses(compare_outputs(before, logits(broken, windows), "causal-lm"))  # -57 dB


def test_different_seeds_are_different_rotations_of_the_same_function(tiny_onnx):
    windows = [np.random.default_rng(2).integers(0, 256, (1, 32))]
    a = Rotate(seed=1).run(tiny_onnx.copy(), PassContext()).model
    b = Rotate(seed=2).run(tiny_onnx.copy(), PassContext()).model
    wa, wb = (m.graph.tensors()["model.layers.0.mlp.down_proj.weight"].values for m in (a, b))
    assert not np.allclose(wa, wb)
    assert not EXACT.misses(compare_outputs(logits(a, windows), logits(b, windows), "causal-lm"))


def test_fx_form_rotates_the_parameters_and_lowers_to_the_same_logits(tiny_fx, monkeypatch):
    """The FX form (for QAT): torch logits unchanged, the tied table one parameter, the final γ a
    linear whose weight lowers under the name the ONNX form gives it."""
    import graphopt

    ids = np.random.default_rng(3).integers(0, 256, (2, 40))
    before = fx_logits(tiny_fx, ids)
    result = Rotate().run(tiny_fx.copy(), PassContext())
    assert result.changed and result.stats["gamma_matmuls"] == 1 and result.stats["writers"] == 4
    assert not EXACT.misses(compare_outputs([before], [fx_logits(result.model, ids)], "causal-lm"))
    gm = result.model.fx
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")
    assert all(np.all(p.detach().numpy() == 1) for n, p in gm.named_parameters() if n.endswith("norm.weight"))
    lowered = graphopt.lower(result.model, log=lambda _: None)
    assert "model.norm.rotated_gain" in lowered.graph.tensors()
    assert not EXACT.misses(compare_outputs([before], [lowered.runner()({"input_ids": ids})[0]], "causal-lm"))
    unnormalised_hadamard(monkeypatch)
    broken = Rotate().run(tiny_fx.copy(), PassContext()).model
    assert EXACT.misses(compare_outputs([before], [fx_logits(broken, ids)], "causal-lm"))


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
    for b, a in zip(before, after):  # 119.8 and 120.2 dB measured
        assert metrics.sqnr_db(b, a) > 115 and np.array_equal(b.argmax(-1), a.argmax(-1))
    quantize = get_pass("quantize")(weight_bits=16, activation_bits=8, observer="mse", int16_inputs=("*.mlp.down_proj.weight",))
    ctx = PassContext(calib=smollm2_calib, progress=False)
    plain = quantize.run(smollm2_onnx.copy(), ctx).model
    turned = quantize.run(rotated.copy(), ctx).model
    sqnr = [np.mean([metrics.sqnr_db(b, q) for b, q in zip(before, logits(m, smollm2_eval[:2]))]) for m in (plain, turned)]
    # 27.6 dB with the rotation; without it (the variant the bound must refuse) 18.6
    assert sqnr[1] > 26.5 and not sqnr[0] > 26.5, sqnr


def test_gain_matrices_are_found_in_both_forms(tiny_fx, tiny_onnx):
    import graphopt
    from graphopt.passes.rotate import gain_matrices

    assert gain_matrices(tiny_fx) == () and gain_matrices(tiny_onnx) == ()
    rotated = Rotate().run(tiny_fx.copy(), PassContext()).model
    assert gain_matrices(rotated) == ("model.norm.rotated_gain",)
    assert gain_matrices(graphopt.lower(rotated, log=lambda _: None)) == ("model.norm.rotated_gain",)


def test_an_untied_lm_head_takes_the_final_gain_and_recipes_naming_its_matrix_hold(tiny_onnx):
    """Untied, the lm_head reads the final norm like any linear: its γ is folded in, no gain matrix is
    made, and its name is recorded as folded, so `int16_weights: [model.norm.rotated_gain]` (a recipe
    for tied models) quantizes an untied model too; a name no rotation knows is still refused. Tied,
    the matrix is a weight and is not listed as folded."""
    import transformers

    import graphopt
    from graphopt.errors import GraphoptError
    from graphopt.frontends.decoder import llama_decoder
    from graphopt.passes.rotate import gain_matrices

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # gains of their own (identical ones are one constant in the exported graph)
        for name, parameter in hf.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    untied = llama_decoder(hf, None, {"capacity": 32}, log=lambda _: None)
    quiet = dict(log=lambda *_: None, progress=False)
    result = graphopt.Pipeline([Rotate()], **quiet).run(untied)  # the FX form's rule, as the ONNX form's below
    assert "model.norm.rotated_gain" in result.model.meta.extra["folded_gains"] and gain_matrices(result.model) == ()
    quantize = get_pass("quantize")
    graphopt.Pipeline([Rotate(), quantize(activation_bits=0, int16_weights=["model.norm.rotated_gain"])], **quiet).run(
        untied)
    with pytest.raises(GraphoptError, match="'int16_weights': 'model.norm.gain' matches no weight"):
        graphopt.Pipeline([Rotate(), quantize(activation_bits=0, int16_weights=["model.norm.gain"])], **quiet).run(untied)
    onnx_form = Rotate().run(graphopt.lower(untied, log=lambda _: None), PassContext()).model
    assert "model.norm.rotated_gain" in onnx_form.meta.extra["folded_gains"] and gain_matrices(onnx_form) == ()
    tied = Rotate().run(tiny_onnx.copy(), PassContext()).model
    assert "model.norm.rotated_gain" not in tied.meta.extra["folded_gains"]
    assert gain_matrices(tied) == ("model.norm.rotated_gain",)
