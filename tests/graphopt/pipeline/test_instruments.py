"""Instruments of the pass manager: the validity check names the step, each instrument is optional."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.errors import PipelineError
from graphopt.pipeline import Pipeline
from graphopt.pipeline.instruments import Checker, Fidelity, Sizes, Timing
from graphopt.pipeline.passes import Pass, PassResult


@dataclass(frozen=True)
class _AddZero(Pass):
    """Adds 0 to the first output: valid, changes the graph, not the values."""

    name: ClassVar[str] = "test_add_zero"

    def run_onnx(self, model, ctx):
        graph = model.graph
        out = graph.outputs[0]
        inner = gs.Variable(f"{out.name}_before_add{len(graph.nodes)}", dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = inner
        zero = gs.Constant(f"zero{len(graph.nodes)}", np.zeros((), np.float32))
        graph.nodes.append(gs.Node("Add", name=f"add_zero{len(graph.nodes)}", inputs=[inner, zero], outputs=[out]))
        return PassResult(model, True)


@dataclass(frozen=True)
class _WrongType(Pass):
    """Feeds an int64 constant into a float Add: onnx.checker's type inference must refuse it."""

    name: ClassVar[str] = "test_wrong_type"

    def run_onnx(self, model, ctx):
        node = next(n for n in model.graph.nodes if n.op == "Add" and n.outputs[0].dtype == np.float32)
        node.inputs[1] = gs.Constant("int_operand", np.ones((), np.int64))
        return PassResult(model, True)


def test_an_invalid_result_fails_naming_the_last_changing_step(tiny_onnx):
    pipeline = Pipeline([_WrongType(), _AddZero()], verify=False, log=None)
    with pytest.raises(PipelineError, match="last changed by 'test_add_zero'.*not a valid ONNX model"):
        pipeline.run(tiny_onnx)


def test_checking_every_step_names_the_step_that_broke_it(tiny_onnx):
    pipeline = Pipeline([_WrongType(), _AddZero()], instruments=[Checker(every_step=True)], log=None)
    with pytest.raises(PipelineError, match="output of step 'test_wrong_type' is not a valid ONNX model"):
        pipeline.run(tiny_onnx)


def test_a_valid_pipeline_passes_the_check(tiny_onnx):
    result = Pipeline([_AddZero()], verify=False, log=None).run(tiny_onnx)
    assert result.report.steps[0].changed


def test_instruments_are_optional(tiny_onnx):
    bare = Pipeline([_AddZero()], instruments=[], log=None).run(tiny_onnx).report.steps[0]
    assert bare.seconds is None and bare.nodes is None and bare.fidelity == {}
    measured = Pipeline([_AddZero()], instruments=[Sizes(), Fidelity(), Timing()], log=None).run(
        tiny_onnx).report.steps[0]
    assert measured.nodes[1] == measured.nodes[0] + 1 and measured.seconds > 0
    assert measured.fidelity["sqnr_db"] == float("inf") and measured.fidelity["cosine"] == pytest.approx(1.0)


def test_fidelity_notes_a_model_without_sample_inputs(tiny_onnx):
    bare = tiny_onnx.replace(sample_inputs=[])
    step = Pipeline([_AddZero()], instruments=[Fidelity()], log=None).run(bare).report.steps[0]
    assert step.fidelity == {} and "no sample inputs" in step.notes[0]


@dataclass(frozen=True)
class _WeightOnGrid(Pass):
    """Rounds every MatMul weight to 8 bits per output channel, kept as float constants; with `as_dq`,
    holds the same values as uint8 codes + DequantizeLinear instead (the same math)."""

    name: ClassVar[str] = "test_weight_on_grid"
    as_dq: bool = False

    def run_onnx(self, model, ctx):
        graph = model.graph
        for node in [n for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]:
            weight = np.asarray(node.inputs[1].values, np.float32)
            scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
            codes = (np.clip(np.rint(weight / scale), -127, 127) + 128).astype(np.uint8)
            if not self.as_dq:
                node.inputs[1] = gs.Constant(f"{node.name}_grid", (codes.astype(np.float32) - 128) * scale)
                continue
            values = gs.Variable(f"{node.name}_dq", dtype=np.float32, shape=list(weight.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", name=f"{node.name}_dq", attrs={"axis": 1}, inputs=[
                gs.Constant(f"{node.name}_codes", codes), gs.Constant(f"{node.name}_scale", scale),
                gs.Constant(f"{node.name}_zero", np.full(scale.shape, 128, np.uint8))], outputs=[values]))
            node.inputs[1] = values
        graph.toposort()
        return PassResult(model, True)


def test_a_steps_fidelity_is_its_graphs_own_math(tiny_onnx):
    # onnxruntime's default fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations
    # (about 40 dB here); the report must show that writing the same weights as codes changes nothing
    steps = Pipeline([_WeightOnGrid(), _WeightOnGrid(as_dq=True)], instruments=[Fidelity()], log=None).run(
        tiny_onnx.copy()).report.steps
    assert steps[1].fidelity["sqnr_db"] > 90 and steps[1].fidelity["overlap@1"] == 1.0
