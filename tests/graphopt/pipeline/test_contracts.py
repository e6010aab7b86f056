"""Every registered pass keeps its contract: `mutates_input` and `changed` say what really happened.

Each pass runs under the `Contracts` instrument on the tiny Llama, in every IR form it implements,
once where it has work to do and, where one exists, once where it has none ("again": the same pass
on its own output, which an idempotent pass or one that refuses quantized input leaves alone). A
pass added to the registry without a case here fails `test_every_registered_pass_has_a_case`.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from graphopt.errors import PipelineError
from graphopt.ir import Model
from graphopt.pipeline import Pipeline, available_passes
from graphopt.pipeline.instruments import Contracts, Timing
from graphopt.pipeline.passes import Pass, PassResult
from graphopt.quant.encodings import Encodings


def _encodings_file(tmp_path, tiny_onnx) -> str:
    quantized = Pipeline([available_passes()["quantize"]()], verify=False, check=False, log=None).run(
        tiny_onnx, calib=tiny_onnx.sample_inputs).model
    return str(Encodings.from_meta(quantized.meta.encodings).write(tmp_path / "tiny.json"))


# name -> (options with work to do, options with nothing to do, "again", or None)
CASES = {
    "awq": ({}, {"weights": ("no-such-weight",)}),
    "cleanup": ({}, "again"),
    "rotate": ({}, None),
    "quantize": ({}, "again"),
    "quantize_kv": ({}, "again"),
    "fake_quantize": ({}, "again"),
    "fold_encodings": ({"encodings": "<file>"}, None),
    "fuse_ort_ops": ({}, "again"),
    "nm_sparsity": ({"method": "magnitude"}, "again"),
    "online_rotate": ({}, None),
    "prune_structure": ({"heads": 1, "ffn_ratio": 0.25}, {}),
    "smooth_quant": ({"alpha": 0.5}, {"weights": ("no-such-weight",)}),
    "store_half": ({"min_elements": 16}, "again"),
    "upgrade_opset": ({"opset": 22}, "again"),  # the tiny Llama is at opset 21
    "use_ort_kernels": ({}, "again"),
}
# passes that act on decoders only: they run on the tiny Llama as an ort-form decoder
DECODER_PASSES = {"quantize_kv"}
# passes whose input must be other passes' output: (pass, options) in order
PREPARE = {"use_ort_kernels": (("quantize", {}),),
           "store_half": (("quantize", {"activation_bits": 0, "half_scales": True}), ("use_ort_kernels", {}))}


def test_every_registered_pass_has_a_case():
    missing = sorted(set(available_passes()) - set(CASES))
    assert not missing, f"add a contract case for {missing}"


def _run(name, options, model, tmp_path, tiny_onnx):
    """(the step's record, the result model) of the pass alone under the contract checks."""
    options = {k: (_encodings_file(tmp_path, tiny_onnx) if v == "<file>" else v) for k, v in options.items()}
    cls = available_passes()[name]
    result = Pipeline([cls.from_options(options)], instruments=[Contracts(), Timing()]).run(
        model, calib=model.sample_inputs)
    return result.report.steps[-1], result.model


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_keeps_its_contract(name, tiny_fx, tiny_onnx, tmp_path):
    if name not in available_passes():
        pytest.skip(f"pass '{name}' is not registered")
    work, idle = CASES[name]
    cls = available_passes()[name]
    for form in cls.forms():
        model = tiny_fx if form == "fx" else tiny_onnx
        if name in DECODER_PASSES:
            from graphopt.lowering import lower
            from tests.decoding import tiny_decoder

            model = lower(tiny_decoder("ort"), log=lambda _: None)
        if name in PREPARE:
            steps = [available_passes()[p].from_options(o) for p, o in PREPARE[name]]
            model = Pipeline(steps, verify=False, check=False, log=None).run(model, calib=model.sample_inputs).model
        step, out = _run(name, work, model, tmp_path, tiny_onnx)
        assert step.changed, f"{name} ({form}) found nothing to do on the tiny Llama"
        if idle == "again":
            assert not _run(name, work, out, tmp_path, tiny_onnx)[0].changed
        elif idle is not None:
            assert not _run(name, idle, model, tmp_path, tiny_onnx)[0].changed


@dataclass(frozen=True)
class _Liar(Pass):
    """Scales a weight in place (writes into an array its input shares) and says it changed nothing."""

    name: ClassVar[str] = "test_contract_liar"
    mutates_input: ClassVar[bool] = False
    honest_about_change: bool = False

    def run_onnx(self, model, ctx):
        weight = next(t for t in model.graph.tensors().values() if getattr(t, "values", None) is not None
                      and np.asarray(t.values).dtype == np.float32 and np.asarray(t.values).size > 16)
        weight.values *= 2.0
        return PassResult(model, self.honest_about_change)


def test_contract_violations_are_caught(tiny_onnx):
    # its own arrays: a copy() would share the session model's, and the liar writes into them
    model = Model.from_onnx(tiny_onnx.to_onnx(), name=tiny_onnx.name)
    with pytest.raises(PipelineError, match="declares mutates_input False"):
        Pipeline([_Liar()], instruments=[Contracts()]).run(model)


@dataclass(frozen=True)
class _Silent(Pass):
    """Adds a node and reports changed=False."""

    name: ClassVar[str] = "test_contract_silent"

    def run_onnx(self, model, ctx):
        import onnx_graphsurgeon as gs

        out = model.graph.outputs[0]
        inner = gs.Variable(f"{out.name}_inner", dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = inner
        model.graph.nodes.append(gs.Node("Identity", name="silent_identity", inputs=[inner], outputs=[out]))
        return PassResult(model, False)


def test_an_unreported_change_is_caught(tiny_onnx):
    with pytest.raises(PipelineError, match="returned changed=False, but its output differs"):
        Pipeline([_Silent()], instruments=[Contracts()]).run(tiny_onnx)
