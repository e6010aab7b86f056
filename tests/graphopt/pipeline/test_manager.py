"""The pass manager: planning forms, auto-lowering, per-step records, reports, errors that name passes."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.errors import OptionError, PipelineError, UnsupportedGraphError
from graphopt.pipeline import Pipeline
from graphopt.pipeline.passes import Pass, PassResult

RAN: list[str] = []


@dataclass(frozen=True)
class TouchFx(Pass):
    """FX-only; changes nothing, records that it ran."""

    name: ClassVar[str] = "touch_fx"

    def run_fx(self, model, ctx):
        RAN.append(self.name)
        return PassResult(model, False)


@dataclass(frozen=True)
class ScaleLogits(Pass):
    """ONNX-only; multiplies the first output by `factor` through a new Mul node."""

    name: ClassVar[str] = "scale_logits"
    factor: float = 1.0

    def run_onnx(self, model, ctx):
        RAN.append(self.name)
        graph = model.graph
        out = graph.outputs[0]
        tag = len(graph.nodes)
        inner = gs.Variable(f"{out.name}_unscaled{tag}", dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = inner
        factor = gs.Constant(f"scale_logits_factor{tag}", np.array(self.factor, np.float32))
        graph.nodes.append(gs.Node("Mul", name=f"scale_logits_mul{tag}", inputs=[inner, factor], outputs=[out]))
        return PassResult(model, True, {"scaled": 1, "share": {"nodes": [1, tag + 1]}, "names": [inner.name]})


@dataclass(frozen=True)
class Broken(Pass):
    name: ClassVar[str] = "broken"

    def run_onnx(self, model, ctx):
        raise UnsupportedGraphError("no attention block matched")


@pytest.fixture(autouse=True)
def _reset():
    RAN.clear()


def test_onnx_pass_after_fx_pass_lowers_automatically(tiny_fx, tmp_path):
    pipeline = Pipeline([TouchFx(), ScaleLogits(factor=1.0)], log=lambda *a: None)
    assert [(step.name, step.pass_ is None) for step in pipeline.plan("fx")] == [
        ("touch_fx", False), ("lower", True), ("scale_logits", False)]
    result = pipeline.run(tiny_fx)
    assert RAN == ["touch_fx", "scale_logits"]
    assert result.model.form == "onnx" and tiny_fx.form == "fx"
    assert [s.name for s in result.report.steps] == ["touch_fx", "lower", "scale_logits"]
    made = {n.name: result.model.meta.provenance.get(n.name) for n in result.model.graph.nodes if n.op == "Mul"}
    assert [v for k, v in made.items() if k.startswith("scale_logits_mul")] == ["scale_logits"]


def test_fx_pass_after_onnx_pass_is_rejected_before_anything_runs(tiny_fx):
    pipeline = Pipeline([ScaleLogits(), TouchFx()], log=lambda *a: None)
    with pytest.raises(PipelineError) as info:
        pipeline.run(tiny_fx)
    assert RAN == []
    message = str(info.value)
    assert "'touch_fx' (#2)" in message and "scale_logits" in message


def test_step_records_and_saved_report(tiny_onnx, tmp_path):
    model = tiny_onnx.copy()
    nodes_before = model.num_nodes()
    result = Pipeline([ScaleLogits(factor=1.0), ScaleLogits(factor=2.0)], log=lambda *a: None).run(model)
    first, second = result.report.steps
    assert first.seconds > 0 and first.changed and first.stats["scaled"] == 1
    assert first.nodes == (nodes_before, nodes_before + 1)
    assert first.params == (model.num_params(), model.num_params() + 1)
    assert first.bytes == (model.num_bytes(), model.num_bytes() + 4)
    assert first.diff["ops_added"] == {"Mul": 1} and not first.diff["ops_removed"]
    assert first.fidelity["sqnr_db"] == float("inf") and first.fidelity["overlap@1"] == 1.0
    # x2 keeps the argmax but not the values: 20·log10(1/1) = 0 dB against the step's input
    assert second.fidelity["sqnr_db"] == pytest.approx(0.0, abs=1e-4)
    assert second.fidelity["overlap@1"] == 1.0
    assert model.num_nodes() == nodes_before  # the caller's model was copied, not edited

    js, md = result.report.save(tmp_path / "out")
    data = json.loads(js.read_text())
    assert [s["name"] for s in data["steps"]] == ["scale_logits", "scale_logits"]
    assert data["steps"][0]["fidelity"]["sqnr_db"] == "inf"
    text = md.read_text()
    assert "| scale_logits | onnx |" in text and "+1 Mul" in text and "sqnr_db" in text
    # statistics: [part, whole] pairs read as part/whole (int16_share), lists stay in the JSON
    assert f"scaled=1, share=nodes 1/{nodes_before + 1}\n" in text and data["steps"][0]["stats"]["names"]


def test_error_inside_a_pass_names_it_and_the_passes_before(tiny_onnx):
    pipeline = Pipeline([ScaleLogits(), ScaleLogits(), Broken()], verify=False, log=lambda *a: None)
    with pytest.raises(PipelineError) as info:
        pipeline.run(tiny_onnx)
    message = str(info.value)
    assert "pass 'broken' failed" in message
    assert "after: scale_logits, scale_logits" in message
    assert "no attention block matched" in message


def test_bad_pass_options_and_non_passes():
    with pytest.raises(OptionError, match="factor"):
        ScaleLogits(factor="big")
    with pytest.raises(OptionError, match="unknown option 'bogus'"):
        ScaleLogits.from_options({"bogus": 1})
    with pytest.raises(PipelineError, match="Pass instances"):
        Pipeline(["cleanup"])
