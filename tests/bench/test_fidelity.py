"""bench/fidelity.py: pipeline specs (pass names or recipe files) build the right passes."""

import pytest
from bench_scripts import ROOT, load_bench

from graphopt.errors import GraphoptError

fidelity = load_bench("fidelity")


def test_pass_names_and_recipes_build_pipelines(tiny_onnx):
    passes, calib = fidelity.build_pipeline("cleanup, cleanup")
    assert [p.name for p in passes] == ["cleanup", "cleanup"]
    feeds = calib(tiny_onnx)  # byte windows for the tiny model (no tokenizer)
    assert len(feeds) == 8 and feeds[0]["input_ids"].shape == (1, 128)
    passes, _ = fidelity.build_pipeline(str(ROOT / "samples" / "recipes" / "cleanup.yaml"))
    assert [p.name for p in passes] == ["cleanup"]


def test_bad_specs_are_named():
    with pytest.raises(GraphoptError, match="unknown pass 'no_such_pass'"):
        fidelity.build_pipeline("no_such_pass")
    with pytest.raises(GraphoptError, match="names no pass"):
        fidelity.build_pipeline(" , ")
