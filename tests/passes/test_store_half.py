"""store_half: exactly-half float32 constants stored as float16, same outputs, fewer bytes, folded at load."""

import numpy as np
import onnx

import graphopt
from graphopt.ir.runtime import ort_session
from graphopt.passes import Cleanup, FuseOrtOps, Quantize, StoreHalf, UseOrtKernels
from graphopt.pipeline.passes import PassContext
from tests.decoding import tiny_decoder, tiny_feeds


def _quiet(*_):
    pass


def _kernel_form(half_scales: bool):
    calib, feeds = tiny_feeds()
    steps = [Quantize(weight_bits=8, activation_bits=0, embedding_block_size=32, half_scales=half_scales),
             UseOrtKernels(accuracy_level_8bit=0), FuseOrtOps()]
    return graphopt.Pipeline(steps, log=_quiet).run(tiny_decoder("ort"), calib=calib).model, feeds


def _initializer_bytes(model) -> int:
    return sum(np.asarray(t.values).nbytes for t in model.graph.tensors().values() if hasattr(t, "values"))


def _outputs(model, feeds):
    externals = {}
    session = ort_session(model.to_onnx(externals=externals), threads=1, externals=externals)
    return [session.run(None, f) for f in feeds]


def test_half_scales_are_stored_half_with_the_same_outputs(tmp_path):
    model, feeds = _kernel_form(half_scales=True)
    before = _outputs(model, feeds)
    result = StoreHalf(min_elements=16).run(model.copy(), PassContext(progress=False))  # the tiny model's are small
    assert result.changed and result.stats["constants"] >= 2
    half = result.model
    saved = _initializer_bytes(model) - _initializer_bytes(half)
    assert saved == result.stats["bytes_saved"] > 0
    for got, want in zip(_outputs(half, feeds), before):
        for a, b in zip(got, want):
            assert np.array_equal(a, b)
    stored = [t for t in half.graph.tensors().values() if getattr(t, "values", None) is not None
              and np.asarray(t.values).dtype == np.float16]
    assert stored and all(t.name.endswith("_float16") for t in stored)
    # a later recipe's cleanup (converting this output again) keeps them half: its folding skips widening Casts
    again = Cleanup().run(half.copy(), PassContext(progress=False)).model
    assert _initializer_bytes(again) == _initializer_bytes(half)
    assert sum(n.op == "Cast" for n in again.graph.nodes) == sum(n.op == "Cast" for n in half.graph.nodes)
    # onnxruntime folds the Casts when it loads the model: the optimized graph reads float32 initializers
    import onnxruntime as ort

    source, path = tmp_path / "half.onnx", tmp_path / "optimized.onnx"
    onnx.save(half.to_onnx(), str(source))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(path), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in optimized.graph.node)
    assert not any(n.op_type == "Cast" and n.input[0].endswith("_float16") for n in optimized.graph.node)


def test_constants_float16_would_round_stay_float32():
    model, _ = _kernel_form(half_scales=False)  # per-channel scales of float weights: not float16 values
    scales = [n for n in model.graph.nodes if n.op == "MatMulNBits"]
    assert scales
    result = StoreHalf(min_elements=1).run(model.copy(), PassContext(progress=False))
    kept = {t.name for t in result.model.graph.tensors().values() if getattr(t, "values", None) is not None
            and np.asarray(t.values).dtype == np.float32}
    assert all(n.inputs[2].name in kept for n in scales)


def test_a_float_model_is_left_alone(tiny_onnx):
    result = StoreHalf().run(tiny_onnx.copy(), PassContext(progress=False))
    assert not result.changed
    assert "no float32 constant" in result.stats["reason"]
