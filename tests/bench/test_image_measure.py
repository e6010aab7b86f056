"""The bench's image measure: a small opset-13 vision model calibrated on the protocol's first
images and scored on the next, graphopt's W8A8 close to the float model and 4-bit weights not."""

import pytest

from bench.report import render_suite
from bench.runner import run_suite
from bench.spec import load_protocol, parse_suites
from tests.vision import tiny_vision_model, write_images

W8A8 = {"quantize": {"weight_bits": 8, "activation_bits": 8, "observer": "mse"}}
SUITE = {"images": {"title": "Image suite", "about": "A small vision model.", "tables": [{
    "name": "cnn", "title": "tiny CNN", "model": "cnn", "measure": "image", "about": "What the rows show.",
    "columns": ["cosine", "min_batch_cosine", "bytes"], "options": {"latency": False},
    "rows": [
        {"name": "fp32", "build": "fp32", "reference": True},
        {"name": "w8a8", "build": {"passes": ["upgrade_opset", W8A8]}},
        {"name": "w4a8", "build": {"passes": ["upgrade_opset", {"quantize": {**W8A8["quantize"], "weight_bits": 4}}]}},
    ],
    "targets": [{"row": "w8a8", "column": "cosine", "min": 0.999}],
}]}}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "images", 8, seed=3)
    (root / "images" / "README.txt").write_text("not an image: the protocol's pattern leaves it out")
    protocol = load_protocol().replace(
        models={"cnn": str(tiny_vision_model(root / "cnn.onnx", opset=13))},
        images={"source": str(root / "images"), "pattern": "*.png", "calibration": 4, "evaluation": 4,
                "preprocessing": {"cnn": {"size": [32, 32], "mean": [0.5], "std": [0.5]}}})
    suite = parse_suites(SUITE, "test", protocol)["images"]
    return suite, run_suite(suite, protocol, command="python -m bench run images", log=lambda _: None)


def test_rows_are_scored_on_the_images_after_the_calibration_ones(result):
    suite, measured = result
    rows = {r["name"]: r for r in measured["rows"]}
    # measured 0.99993 mean, 0.99983 worst image; the 4-bit variant (0.9883, 0.9750) must miss the same bounds
    assert rows["w8a8"]["cosine"] >= 0.9995 and rows["w8a8"]["min_batch_cosine"] >= 0.999
    assert rows["w4a8"]["cosine"] < 0.9995 and rows["w4a8"]["min_batch_cosine"] < 0.999
    text = render_suite(suite, measured)
    assert "images: the 4 of" in text and "after the first 4 (*.png, name order)" in text
    assert "calibration: the first 4 images" in text and "| w8a8: cosine >= 0.999 |" in text
