"""`graphopt convert --calibration`: a third-party-style vision model at opset 13 calibrated from an
image folder (upgraded, quantized W8A8, close to the float model on images it never saw), and the
tiny Llama calibrated from a user's own text file."""

import json

import onnx
import pytest

import graphopt
from graphopt import cli
from graphopt.evaluation.metrics import cosine
from graphopt.frontends.calibration import CalibrationSpec, ImageSpec, Source
from graphopt.ir import Model
from graphopt.passes import Quantize
from graphopt.pipeline import Pipeline
from tests.vision import tiny_vision_model, write_images

VISION_RECIPE = """\
passes:
  - cleanup
  - quantize: {weight_bits: 8, activation_bits: 8, observer: mse}
calibration:
  windows: 8
  image: {size: [32, 32], resize: cover, mean: [0.5], std: [0.5]}
"""
HELD_OUT_COSINE = 0.9995  # measured 0.99969 (the worst of 8 held-out images), less a small margin


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    model = tiny_vision_model(root / "v.onnx", opset=13)
    write_images(root / "calib", 8, seed=1)
    write_images(root / "held", 8, seed=2)
    (root / "r.yaml").write_text(VISION_RECIPE)
    return root, model


def _held_out_cosines(root, model_path, out):
    spec = CalibrationSpec(sources=(Source(str(root / "held")),), windows=8,
                           image=ImageSpec(size=(32, 32), mean=(0.5,), std=(0.5,)))
    float_model = graphopt.load(str(model_path))
    quantized = Model.from_onnx(onnx.load(str(out / "model.onnx")))
    run_float, run_quantized = float_model.runner(), quantized.runner()
    return [cosine(run_float(f)[0], run_quantized(f)[0], axis=None) for f in spec.feeds(float_model)]


def test_an_opset_13_vision_model_quantizes_from_an_image_folder(vision_run, capsys):
    root, model = vision_run
    out = root / "out"
    assert cli.main(["convert", str(model), "--recipe", str(root / "r.yaml"), "--calibration", str(root / "calib"),
                     "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"calibration: 8 feeds from {root / 'calib'}" in err and "v has opset 13: upgrade_opset runs first" in err
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["upgrade_opset", "cleanup", "quantize"]
    assert report["steps"][0]["stats"]["from_opset"] == 13 and report["steps"][2]["stats"]["weights"] == 3
    cosines = _held_out_cosines(root, model, out)
    assert min(cosines) >= HELD_OUT_COSINE


def test_calibrating_on_wrongly_scaled_images_misses_the_same_bound(vision_run, capsys):
    root, model = vision_run
    (root / "byte.yaml").write_text("size: [32, 32]\nscale: byte\nmean: [0.5]\nstd: [0.5]\n")
    out = root / "broken"
    assert cli.main(["convert", str(model), "--recipe", str(root / "r.yaml"), "--calibration", str(root / "calib"),
                     "--calibration-image-spec", str(root / "byte.yaml"), "-o", str(out)]) == 0
    cosines = _held_out_cosines(root, model, out)
    assert min(cosines) < HELD_OUT_COSINE


def test_a_users_text_file_calibrates_the_tiny_llama(tmp_path, capsys, tiny_onnx):
    text = tmp_path / "my.txt"
    text.write_text("Remind me to call the dentist tomorrow at ten. What is the weather like in Lisbon? " * 20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {weight_bits: 8, activation_bits: 8}\n"
                      "calibration:\n  source: sample:pydoc-topics\n  windows: 16\n  length: 128\n")
    out = tmp_path / "out"
    assert cli.main(["convert", "sample:tiny-llama", "--recipe", str(recipe), "--calibration", str(text),
                     "--calibration-windows", "4", "--calibration-length", "64", "-o", str(out)]) == 0
    assert f"calibration: 4 feeds from {text}" in capsys.readouterr().err
    written = Model.from_onnx(onnx.load(str(out / "model.onnx"))).meta.encodings
    feeds = CalibrationSpec(sources=(Source(str(text)),), windows=4, length=64).feeds(tiny_onnx)
    assert feeds[0]["input_ids"][0, :5].tolist() == list(b"Remin")

    def activations(encodings):
        return {name: e for name, e in encodings.items() if e["kind"] == "activation"}

    def calibrated(calib):
        pipeline = Pipeline([Quantize(weight_bits=8, activation_bits=8)], verify=False, log=lambda _: None)
        return activations(pipeline.run(tiny_onnx.copy(), calib=calib).model.meta.encodings)

    from_file = calibrated(feeds)
    assert from_file and activations(written) == from_file
    pydoc = calibrated(CalibrationSpec(windows=4, length=64).feeds(tiny_onnx))
    assert pydoc.keys() == from_file.keys() and pydoc != from_file
