"""QAT: distillation losses (KD, reverse KL, BiLD as the paper defines it), the training loop, encodings export."""

import numpy as np
import pytest
import torch

import graphopt
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.training import distillation, fake_quant


@pytest.fixture(scope="module")
def windows():
    return lm_windows(None, "calib", 3, 24)


@pytest.fixture(scope="module")
def student(tiny_fx, windows):
    model = tiny_fx.copy()
    get_pass("fake_quantize")(weight_bits=4).run(model, PassContext(calib=[{"input_ids": w} for w in windows], progress=False))
    return model


def test_bild_matches_its_definition_on_a_small_case():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    k, temp = 4, 3.0

    def one_way(lead, follow, teacher_leads):
        idx = lead.topk(k, -1).indices
        zs, zt = (s.gather(-1, idx), t.gather(-1, idx))
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        ds = torch.stack([(zs[..., i] - zs[..., j]) / temp for i, j in pairs], -1)
        dt = torch.stack([(zt[..., i] - zt[..., j]) / temp for i, j in pairs], -1)
        p = dt.softmax(-1)
        return (p * (p.log() - ds.log_softmax(-1))).sum(-1).mean()

    expected = one_way(t, s, True) + one_way(s, t, False)
    assert distillation.bild_loss(s, t, top_k=k, temperature=temp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation.bild_loss(t, t, k, temp).item() == pytest.approx(0.0, abs=1e-6)
    # differences ignore a shift of all logits; KD ignores it too (softmax)
    assert distillation.bild_loss(t + 5.0, t, k, temp).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation.kd_loss(t + 5.0, t).item() == pytest.approx(0.0, abs=1e-5)
    assert distillation.kd_loss(s, t).item() > 0.1


def test_reverse_kd_is_kl_from_the_student():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    temp = 2.0
    p_s, p_t = (s / temp).softmax(-1), (t / temp).softmax(-1)
    expected = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * temp**2
    assert distillation.reverse_kd_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation.reverse_kd_loss(t + 5.0, t).item() == pytest.approx(0.0, abs=1e-5)
    # the two directions differ: reverse KL weighs the student's own mass
    assert distillation.reverse_kd_loss(s, t, temp).item() != pytest.approx(distillation.kd_loss(s, t, temp).item(), rel=1e-2)
    student = s.clone().requires_grad_()
    distillation.reverse_kd_loss(student, t, temp).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("loss, batch", [("kd", 1), ("bild", 1), ("kd", 2), ("rkl", 1)])
def test_training_lowers_the_distillation_loss(tiny_fx, student, windows, loss, batch):
    model = student.copy()
    first = distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=1, lr=0.0, scale_lr=0.0, loss=loss, progress=False)).losses[0]
    report = distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=12, lr=1e-4, scale_lr=1e-2, loss=loss, batch_size=batch, progress=False))
    after = distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=1, lr=0.0, scale_lr=0.0, loss=loss, progress=False)).losses[0]
    assert report.steps == 12 and len(report.losses) == 12 and report.seconds > 0
    assert after < 0.9 * first, (first, after)


@pytest.mark.parametrize("bits, granularity, symmetric", [(8, "tensor", False), (8, "channel", False),
                                                         (8, "channel", True), (16, "tensor", False)])
def test_fused_fake_quant_is_the_same_quantizer(bits, granularity, symmetric):
    """8-bit quantizers take torch's fused kernels; 16-bit ones keep the reference formula."""
    from graphopt.quant.spec import QuantSpec, dtype_for

    torch.manual_seed(0)
    spec = QuantSpec(dtype_for(bits, symmetric), granularity, axis=0 if granularity == "channel" else None,
                     symmetric=symmetric)
    module = fake_quant.FakeQuant(spec, "weight", "w", channels=16 if granularity == "channel" else 1)
    with torch.no_grad():
        module.log_scale.copy_(torch.log(torch.rand(module.log_scale.shape) * 0.05 + 0.01))
        module.zero_point.fill_(0 if symmetric else spec.qmin + (spec.qmax - spec.qmin) // 3)
    x = torch.randn(16, 4096) * 3
    results = []
    for fused in (False, True):
        module.fused, module.log_scale.grad = fused, None
        y = module(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), module.log_scale.grad.clone()))
    (y, grad), (y_fused, grad_fused) = results
    if bits == 16:
        assert torch.equal(y_fused, y) and torch.equal(grad_fused, grad)
        return
    step = module.log_scale.exp().detach().reshape(-1, 1) if granularity == "channel" else module.log_scale.exp().detach()
    moved = (y_fused - y).abs() > 1e-6
    # 1/scale vs division: only values on a rounding boundary may move, by one step
    assert moved.float().mean() < 1e-3
    torch.testing.assert_close(((y_fused - y).abs() / step)[moved], torch.ones(int(moved.sum())), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_fused, grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()))


def test_fused_training_follows_the_reference_and_resets(tiny_fx, student, windows):
    reports = []
    for fused in (False, True):
        model = student.copy()
        seen = []
        first = next(iter(fake_quant.fake_quant_modules(model).values()))
        first.register_forward_pre_hook(lambda module, _: seen.append(module.fused))
        reports.append(distillation.train(model, tiny_fx, windows,
            distillation.TrainConfig(steps=4, lr=1e-4, scale_lr=1e-2, fused=fused, progress=False)))
        assert seen == [fused] * 4
        assert not any(m.fused for m in fake_quant.fake_quant_modules(model).values())
    np.testing.assert_allclose(reports[1].losses, reports[0].losses, rtol=2e-2)


def test_encodings_name_the_lowered_tensors(tiny_fx, student):
    lowered = graphopt.lower(fake_quant.strip_fake_quant(student), log=lambda *_: None)
    feeds = tiny_fx.sample_inputs[0]  # stripped of its quantizers, the student is the float model again
    np.testing.assert_allclose(lowered.run(feeds)[0], tiny_fx.run(feeds)[0], rtol=0, atol=1e-5)
    encodings = fake_quant.export_encodings(student, lowered)
    sites = linear_sites(lowered)
    assert set(encodings.params) == {s.weight for s in sites}  # lm_head.weight -> lm_head.weight.T
    assert set(encodings.activations) == {s.activation for s in sites}
    modules = {m.name: m for m in fake_quant.fake_quant_modules(student).values() if m.kind == "weight"}
    table = encodings.params["lm_head.weight.T"]
    assert table.enc_type == "PER_CHANNEL" and table.bitwidth == 4 and table.axis == 1
    np.testing.assert_array_equal(table.scale, modules["lm_head.weight"].params()[0])
    act = encodings.activations[sites[0].activation]
    assert act.enc_type == "PER_TENSOR" and act.bitwidth == 8 and not act.is_symmetric


def test_fold_encodings_reproduces_the_fake_quant_model(tiny_fx, student):
    """QAT -> export -> fold_encodings: ORT's static QDQ computes what torch's fake-quant computed."""
    lowered = graphopt.lower(fake_quant.strip_fake_quant(student), log=lambda *_: None)
    lowered.meta.encodings = fake_quant.export_encodings(student, lowered).to_meta()
    folded = get_pass("fold_encodings")().run(lowered.copy(), PassContext(progress=False)).model
    feeds = tiny_fx.sample_inputs[0]
    torch_out, ort_out, float_out = student.run(feeds)[0], folded.run(feeds)[0], tiny_fx.run(feeds)[0]
    # a rounding boundary may flip a code between the two runtimes; far below the quantization error
    assert np.abs(torch_out - ort_out).max() < 0.05 * np.abs(torch_out - float_out).max()


def test_validation_keeps_the_best_step(tiny_fx, student, windows):
    """A learning rate that wrecks the student: the kept state is the best validation measurement's,
    and measuring the returned student again gives that score."""
    held_out = lm_windows(None, "eval", 2, 24)
    model = student.copy()
    report = distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=6, lr=0.3, scale_lr=0.3, validate_every=2, progress=False), validation=held_out)
    steps = [step for step, _ in report.validation]
    assert steps == [0, 2, 4, 6]
    scores = dict(report.validation)
    assert scores[report.best_step] == max(scores.values())
    assert scores[6] < scores[report.best_step]  # the wrecked end was not kept
    reference = [tiny_fx.run({"input_ids": w})[0].argmax(-1) for w in held_out]
    kept = np.mean([(model.run({"input_ids": w})[0].argmax(-1) == r).mean() for w, r in zip(held_out, reference)])
    assert kept == pytest.approx(scores[report.best_step], abs=1e-9)


def test_errors(tiny_fx, tiny_onnx, windows, student):
    with pytest.raises(UnsupportedGraphError, match="fake_quantize"):
        distillation.train(tiny_fx.copy(), tiny_fx, windows, distillation.TrainConfig(steps=1, progress=False))
    with pytest.raises(OptionError, match="loss"):
        distillation.train(student.copy(), tiny_fx, windows,
            distillation.TrainConfig(steps=1, loss="mse", progress=False))
    with pytest.raises(OptionError, match="steps"):
        distillation.train(student.copy(), tiny_fx, [], distillation.TrainConfig(steps=1, progress=False))
    with pytest.raises(OptionError, match="batch_size"):
        distillation.train(student.copy(), tiny_fx, windows,
            distillation.TrainConfig(steps=1, batch_size=0, progress=False))
    with pytest.raises(UnsupportedGraphError, match="ONNX"):
        fake_quant.export_encodings(student, tiny_fx)


def test_generated_windows_start_with_their_prompt_and_follow_the_teacher(tiny_fx, windows):
    generated = distillation.generate_windows(tiny_fx, windows, 5, length=24, prompt_tokens=6, seed=3, batch_size=2,
                                     progress=False)
    assert len(generated) == 5 and all(w.shape == (1, 24) and w.dtype == np.int64 for w in generated)
    for i, window in enumerate(generated):  # prompts cycle over the given windows
        assert np.array_equal(window[0, :6], windows[i % len(windows)].reshape(-1)[:6])
    again = distillation.generate_windows(tiny_fx, windows, 5, length=24, prompt_tokens=6, seed=3, batch_size=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(generated, again))  # deterministic for a seed
    assert not all(np.array_equal(a, b) for a, b in zip(generated, distillation.generate_windows(
        tiny_fx, windows, 5, length=24, prompt_tokens=6, seed=4, batch_size=2, progress=False)))

    def peaked(ids):  # a teacher sure of token 7 after anything: sampling must follow it
        logits = torch.zeros(*ids.shape, 256)
        logits[..., 7] = 50.0
        return logits

    assert all((w[0, 6:] == 7).all() for w in distillation.generate_windows(peaked, windows, 3, length=12, prompt_tokens=6,
                                                                    progress=False))
    with pytest.raises(OptionError, match="prompt_tokens"):
        distillation.generate_windows(peaked, windows, 3, length=12, prompt_tokens=12)


def test_shuffled_windows_visit_each_window_once_an_epoch():
    order = distillation._WindowOrder(7, seed=1)
    epochs = [[order[e * 7 + i] for i in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(7))
    assert [distillation._WindowOrder(7, None)[p] for p in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_weight_scale_lr_zero_keeps_the_weight_grids(tiny_fx, student, windows):
    model = student.copy()
    before = {n: m.log_scale.detach().clone() for n, m in fake_quant.fake_quant_modules(model).items()}
    weight = model.fx.get_parameter("model.layers.0.mlp.down_proj.weight").detach().clone()
    distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=4, lr=1e-3, scale_lr=1e-2, weight_scale_lr=0.0, progress=False))
    modules = fake_quant.fake_quant_modules(model)
    assert all(torch.equal(modules[n].log_scale, before[n]) for n, m in modules.items() if m.kind == "weight")
    assert any(not torch.equal(modules[n].log_scale, before[n]) for n, m in modules.items() if m.kind == "activation")
    assert not torch.equal(model.fx.get_parameter("model.layers.0.mlp.down_proj.weight"), weight)
    assert all(m.log_scale.requires_grad for m in modules.values())  # trainable again afterwards


def test_teacher_logits_computed_each_step_train_alike(tiny_fx, student, windows):
    runs = []
    for cache in (True, False):
        model = student.copy()
        runs.append(distillation.train(model, tiny_fx, windows,
            distillation.TrainConfig(steps=3, lr=1e-4, scale_lr=1e-2, cache_teacher=cache, shuffle=0, progress=False)).losses)
    # the cache keeps fp16 logits: the first loss agrees to its rounding, later ones after steps
    # taken from slightly different targets (a wrong window or teacher would differ by far more)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=2e-3)
    assert runs[0] == pytest.approx(runs[1], rel=5e-2)


def test_compiled_training_takes_the_eager_steps(tiny_fx, student, windows):
    eager, compiled = student.copy(), student.copy()
    a = distillation.train(eager, tiny_fx, windows,
        distillation.TrainConfig(steps=3, lr=1e-4, scale_lr=1e-2, progress=False)).losses
    b = distillation.train(compiled, tiny_fx, windows,
        distillation.TrainConfig(steps=3, lr=1e-4, scale_lr=1e-2, compile=True, progress=False)).losses
    assert b == pytest.approx(a, rel=2e-3)  # fused kernels round differently, nothing more
    weight = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(compiled.fx.get_parameter(weight), eager.fx.get_parameter(weight), rtol=0, atol=1e-5)


def test_feature_distillation_pulls_every_point_back_to_the_float_model(tiny_fx, student, windows):
    def points(m):  # the feature term alone: the loss with it, less the loss without
        first_loss = lambda **kw: distillation.train(m, tiny_fx, windows,  # noqa: E731
            distillation.TrainConfig(steps=1, lr=0.0, scale_lr=0.0, progress=False, **kw)).losses[0]
        return first_loss(feature_weight=1.0) - first_loss()

    model = student.copy()
    fake_quant.set_fake_quant(model, False)
    assert points(model) == pytest.approx(0.0, abs=1e-6)  # quantizers off: the teacher's own values
    fake_quant.set_fake_quant(model, True)
    first = points(model)
    assert first > 1e-3  # 4-bit weights move what every linear reads
    logits_only = model.copy()
    distillation.train(model, tiny_fx, windows,
        distillation.TrainConfig(steps=12, lr=1e-4, scale_lr=1e-2, feature_weight=10.0, progress=False))
    distillation.train(logits_only, tiny_fx, windows,
        distillation.TrainConfig(steps=12, lr=1e-4, scale_lr=1e-2, progress=False))
    # 12 steps: 0.0286 -> 0.0245 with the feature term, 0.0296 with the logits alone
    assert points(model) < 0.9 * min(first, points(logits_only))
    with pytest.raises(OptionError, match="feature_weight"):
        distillation.train(model, lambda ids: tiny_fx.fx(ids), windows,
            distillation.TrainConfig(steps=1, feature_weight=1.0, progress=False))


def test_feature_loss_weighs_each_point_by_its_own_scale():
    t = [torch.ones(4), 100.0 * torch.ones(4)]
    s = [1.1 * torch.ones(4), 110.0 * torch.ones(4)]  # 10 % off at both points
    assert distillation.feature_loss(s, t).item() == pytest.approx(0.01, rel=1e-5)
