"""quantize_kv: the tiny Llama's decoders with an int8 cache, calibrated; the ort form's run by onnxruntime's
GroupQueryAttention, the portable form's by standard Q/DQ ops; prefill and decode steps read the same codes."""

import collections
import functools
import json

import numpy as np
import pytest

import graphopt
from graphopt.errors import ModelLoadError, OptionError, UnsupportedGraphError
from graphopt.evaluation.generation import Generator
from graphopt.evaluation.metrics import compare_outputs
from graphopt.frontends.corpora import lm_windows
from graphopt.frontends.decoder import decoder_feeds
from graphopt.frontends.decoder_folder import read_decoder_folder, save_decoder
from graphopt.ir.decoder import DecoderSpec
from graphopt.passes import FuseOrtOps, QuantizeKV
from graphopt.pipeline.passes import PassContext
from tests.decoding import PROMPT, tiny_decoder, tiny_feeds


def _quiet(*_):
    pass


@functools.cache
def _float():
    return graphopt.Pipeline([FuseOrtOps()], log=_quiet, progress=False).run(tiny_decoder("ort")).model


@functools.cache
def _quantized(headroom: float = 1.0):
    return QuantizeKV(headroom=headroom).run(_float().copy(), PassContext(calib=tiny_feeds()[0], progress=False))


def _attention(model):
    return [n for n in model.graph.nodes if n.op == "GroupQueryAttention"]


def _present(model, feeds, layer: int, kind: str) -> np.ndarray:
    names = [o.name for o in model.graph.outputs]
    return model.run(feeds)[names.index(f"present.{layer}.{kind}")]


def test_the_cache_becomes_int8_codes_of_calibrated_per_channel_scales():
    result = _quantized()
    model, spec = result.model, DecoderSpec.of(result.model)
    assert result.changed and spec.cache_dtype == "int8" and result.stats["layers"] == spec.layers
    for node in _attention(model):
        assert node.attrs["k_quant_type"] == node.attrs["v_quant_type"] == "PER_CHANNEL"
        assert node.attrs["kv_cache_bit_width"] == 8
        k_scale, v_scale = (t.values for t in node.inputs[12:14])
        assert k_scale.shape == v_scale.shape == (1, spec.kv_heads, 1, spec.head_dim)
        half = spec.head_dim // 2  # a key channel and its rotary partner share one range
        np.testing.assert_array_equal(k_scale[..., :half], k_scale[..., half:])
    cache = {t.name: t.dtype for t in model.graph.inputs + model.graph.outputs if "key" in t.name or "value" in t.name}
    assert set(cache) == set(spec.past_names) | set(spec.present_names)
    assert {np.dtype(d) for d in cache.values()} == {np.dtype(np.int8)}
    # layer 0's keys and values do not depend on the cache: its codes are the float ones rounded by the scales,
    # and on the calibration windows no value needs more than the range
    calib = tiny_feeds()[0][0]
    float_feeds = {**calib}
    quant_feeds = {n: v.astype(np.int8) if n.startswith("past_key_values.") else v for n, v in calib.items()}
    node = _attention(model)[0]
    for kind, scale in (("key", node.inputs[12].values), ("value", node.inputs[13].values)):
        x = _present(_float(), float_feeds, 0, kind)
        codes = _present(model, quant_feeds, 0, kind)
        assert np.abs(x / scale).max() <= 127.5
        np.testing.assert_array_equal(codes, np.clip(np.round(x / scale), -128, 127).astype(np.int8))
        assert np.abs(codes).max() >= 100  # the range is used, not wasted


def test_int8_cache_keeps_the_float_logits_close_and_headroom_trades_resolution():
    calib, evals = tiny_feeds()
    reference = [_float().run(f)[:1] for f in evals]
    fidelity = {}
    for headroom in (1.0, 8.0):
        model = _quantized(headroom).model
        outputs = [model.run({n: v.astype(np.int8) if n.startswith("past_key_values.") else v
                              for n, v in f.items()})[:1] for f in evals]
        fidelity[headroom] = compare_outputs([np.concatenate([r[0][0] for r in reference])],
                                             [np.concatenate([o[0][0] for o in outputs])], "causal-lm")
    assert fidelity[1.0]["overlap@1"] >= 0.95 and fidelity[1.0]["sqnr_db"] >= 20, fidelity
    assert fidelity[8.0]["sqnr_db"] < fidelity[1.0]["sqnr_db"]  # 8x coarser codes are measurably worse


def test_generation_reads_the_same_codes_in_one_chunk_or_token_by_token(tmp_path):
    model = _quantized().model
    save_decoder(model, tmp_path / "out", log=_quiet)
    folder = read_decoder_folder(tmp_path / "out")
    assert folder.spec.cache_dtype == "int8"
    generator = Generator.load(tmp_path / "out", threads=1, log=_quiet)
    whole = generator.start(64).feed(PROMPT)
    steps = generator.start(64)
    one_by_one = np.stack([steps.feed([t])[0] for t in PROMPT])
    np.testing.assert_array_equal(whole, one_by_one)
    assert generator.generate(PROMPT, max_new_tokens=8).tokens == Generator.load(model, threads=1, log=_quiet).generate(
        PROMPT, max_new_tokens=8).tokens


def test_a_config_that_contradicts_the_int8_cache_is_refused(tmp_path):
    save_decoder(_quantized().model, tmp_path / "out", log=_quiet)
    config = json.loads((tmp_path / "out" / "decoder.json").read_text())
    config["spec"]["cache_dtype"] = "float32"
    (tmp_path / "out" / "decoder.json").write_text(json.dumps(config))
    (tmp_path / "out" / ".graphopt-manifest.json").unlink()  # edited by hand, manifest and all
    with pytest.raises(ModelLoadError, match="past_key_values.0.key' is int8"):
        read_decoder_folder(tmp_path / "out")
    config["spec"]["cache_dtype"] = "int4"
    (tmp_path / "out" / "decoder.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cache_dtype"):
        read_decoder_folder(tmp_path / "out")


def test_refusals_and_a_second_run():
    ctx = PassContext(calib=tiny_feeds()[0], progress=False)
    assert not QuantizeKV().run(_quantized().model.copy(), ctx).changed
    with pytest.raises(OptionError, match="headroom"):
        QuantizeKV(headroom=0.5)
    with pytest.raises(OptionError, match="calibration"):
        QuantizeKV().run(_float().copy(), PassContext(progress=False))
    broken = _float().copy()  # a cache tensor that is not the graph's float32 input
    next(t for t in broken.graph.inputs if t.name == "past_key_values.1.value").dtype = np.float16
    with pytest.raises(UnsupportedGraphError, match="past_key_values.1.value"):
        QuantizeKV().run(broken, ctx)
    plain = graphopt.load("sample:tiny-llama", log=_quiet)
    with pytest.raises(UnsupportedGraphError, match="not a decoder"):
        QuantizeKV().run(graphopt.lower(plain, log=_quiet), ctx)


def test_ort_mobile_runs_the_int8_cache_through_decode_steps(tmp_path):
    from graphopt.pipeline import export

    artifact = export(_quantized().model, "ort-mobile", tmp_path / "ort", {"usability": False})
    assert artifact.validation["passed"] and artifact.validation["max_abs_diff"] <= 1e-5
    assert len(artifact.validation["steps"]) == 5


@functools.cache
def _portable():
    decoder = graphopt.lower(tiny_decoder("portable"), log=_quiet)
    calib = decoder_feeds(decoder, lm_windows(None, "calib", 4, 32))
    return decoder, QuantizeKV().run(decoder.copy(), PassContext(calib=calib, progress=False))


def test_portable_form_quantizes_its_cache_with_standard_ops_as_the_ort_form_does():
    _, result = _portable()
    model, spec = result.model, DecoderSpec.of(result.model)
    assert result.changed and spec.cache_dtype == "int8"
    ops = collections.Counter(n.op for n in model.graph.nodes)
    # every cache tensor: its past read through DQ; its new rows out through Q and read back through DQ
    assert ops["QuantizeLinear"] == 2 * spec.layers and ops["DequantizeLinear"] == 4 * spec.layers
    assert {np.dtype(t.dtype) for t in model.graph.inputs + model.graph.outputs
            if t.name in spec.past_names + spec.present_names} == {np.dtype(np.int8)}
    ort_scales = {t.name: t.values for n in _attention(_quantized().model) for t in n.inputs[12:14]}
    portable_scales = {t.name: t.values for n in model.graph.nodes if n.op == "QuantizeLinear" for t in n.inputs[1:2]}
    assert ort_scales.keys() == portable_scales.keys()  # present.N.key.scale, ...: the same calibration, the same scales
    for name, scale in ort_scales.items():
        np.testing.assert_allclose(portable_scales[name], scale, rtol=1e-5)
    portable = Generator.load(model, threads=1, log=_quiet)
    whole = portable.start(64).feed(PROMPT)
    steps = portable.start(64)
    one_by_one = np.stack([steps.feed([t])[0] for t in PROMPT])
    np.testing.assert_allclose(whole, one_by_one, rtol=0, atol=1e-4)
    ort_form = Generator.load(_quantized().model, threads=1, log=_quiet).start(64).feed(PROMPT)
    float_form = Generator.load(_portable()[0], threads=1, log=_quiet).start(64).feed(PROMPT)
    assert np.abs(whole - ort_form).max() < 0.1 * np.abs(whole - float_form).max()  # the same codes, not just close


@pytest.mark.parametrize("backend", ["ort-mobile", "npu-sim", "qnn"])
def test_portable_int8_cache_runs_on_ort_mobile_and_npu_packages_refuse_it_by_name(backend, tmp_path):
    from graphopt.errors import BackendError
    from graphopt.pipeline import export

    model = _portable()[1].model
    if backend == "ort-mobile":
        artifact = export(model, backend, tmp_path / "out", {"usability": False})
        assert artifact.validation["passed"] and artifact.validation["steps"][0] == "prefill"
        return
    with pytest.raises(BackendError, match="int8 codes \\(quantize_kv\\)"):
        export(model, backend, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_passes_after_it_calibrate_on_feeds_of_the_new_cache_type():
    from graphopt.errors import GraphoptError
    from graphopt.ir.decoder import empty_cache_as
    from graphopt.passes import Quantize

    calib = tiny_feeds()[0]
    result = graphopt.Pipeline([QuantizeKV(), Quantize(weight_bits=8, activation_bits=8)], log=_quiet,
                               progress=False).run(tiny_decoder("ort"), calib=calib)
    model = result.model
    assert DecoderSpec.of(model).cache_dtype == "int8" and result.report.steps[-1].stats
    assert any(n.op == "QuantizeLinear" for n in model.graph.nodes)
    assert calib[0]["past_key_values.0.key"].dtype == np.float32  # the caller's feeds are left as they were
    spec = DecoderSpec.of(model)
    held = {**calib[0], "past_key_values.0.key": np.ones((1, spec.kv_heads, 2, spec.head_dim), np.float32)}
    with pytest.raises(GraphoptError, match="past_key_values.0.key"):
        empty_cache_as(spec, held)


def test_removing_kv_heads_after_the_cache_is_quantized_is_refused_by_name():
    from graphopt.errors import GraphoptError
    from graphopt.passes import PruneStructure

    ctx = PassContext(calib=tiny_feeds()[0], progress=False)
    unpacked = QuantizeKV().run(graphopt.lower(tiny_decoder("ort"), log=_quiet), ctx).model
    with pytest.raises(GraphoptError, match="before quantize_kv"):
        PruneStructure(heads=1).run(unpacked, ctx)
