"""upgrade_opset as a pipeline step: upgrades and reports, leaves current models alone, checks its option."""

import numpy as np
import pytest

import graphopt
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import graph_opset
from graphopt.passes import Quantize, UpgradeOpset
from graphopt.pipeline import Pipeline
from graphopt.pipeline.passes import PassContext
from tests.vision import tiny_vision_model


def test_an_opset_13_model_is_upgraded_and_then_quantizes(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=13)))
    feeds = [{"x": np.random.default_rng(i).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)} for i in range(4)]
    result = Pipeline([UpgradeOpset(), Quantize(weight_bits=8, activation_bits=8)], verify=False,
                      log=lambda _: None).run(model, calib=feeds)
    upgrade, quantize = result.report.steps
    assert upgrade.changed and upgrade.stats["from_opset"] == 13 and upgrade.stats["to_opset"] == 21
    assert upgrade.stats["checked_on"] == "given inputs" and upgrade.stats["max_abs_diff"] < 1e-6
    assert quantize.stats["weights"] == 3 and graph_opset(result.model.graph) == 21
    assert graph_opset(model.graph) == 13
    with pytest.raises(UnsupportedGraphError, match=r"'quantize': graph 'v' has opset 13.*run the upgrade_opset"):
        Quantize().run(model, PassContext(calib=feeds))  # the pass alone refuses, naming the fix
    auto = Pipeline([Quantize(weight_bits=8, activation_bits=8)], verify=False, log=lambda _: None).run(model, calib=feeds)
    assert [s.name for s in auto.report.steps] == ["upgrade_opset", "quantize"]  # a Pipeline upgrades by itself
    assert graph_opset(auto.model.graph) == 21


def test_a_current_model_is_not_changed(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=21)))
    result = UpgradeOpset().run(model, PassContext())
    assert result.model is model and not result.changed and result.stats == {}


def test_the_target_opset_must_be_one_the_passes_take():
    with pytest.raises(OptionError, match=r"upgrade_opset': option 'opset' must be >= 21"):
        UpgradeOpset(opset=17)
