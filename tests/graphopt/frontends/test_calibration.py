"""Calibration sources: text files, folders and JSONL tokenized into windows, .npz / .npy feeds
checked against the inputs, image folders preprocessed by a spec, several sources mixed, and
every refusal naming the file and the entry."""

import json

import numpy as np
import pytest
from PIL import Image

import graphopt
from graphopt.errors import RecipeError
from graphopt.frontends.calibration import (
    CalibrationError,
    CalibrationSpec,
    ImageSpec,
    Source,
    command_line_spec,
    parse_image_spec,
    parse_source,
)
from graphopt.frontends.corpora import lm_windows
from graphopt.recipe import parse_recipe
from tests.vision import tiny_vision_model, write_images

TEXT = "The ferry to the island leaves at nine; bring a coat, the wind is cold on the water. " * 8


def _bytes(feeds):
    return [bytes(f["input_ids"][0].astype(np.uint8)) for f in feeds]


# ------------------------------------------------------------------------------------ text
def test_a_text_file_becomes_windows_of_its_own_bytes(tmp_path, tiny_onnx):
    path = tmp_path / "my.txt"
    path.write_text(TEXT)
    feeds = CalibrationSpec(sources=(Source(str(path)),), windows=3, length=16).feeds(tiny_onnx)
    assert [f["input_ids"].shape for f in feeds] == [(1, 16)] * 3 and feeds[0]["input_ids"].dtype == np.int64
    assert _bytes(feeds) == [TEXT.encode()[i * 16:(i + 1) * 16] for i in range(3)]
    with pytest.raises(CalibrationError, match=r"asked for 100 windows of 16 tokens, the text holds 42 \(.*my.txt\)"):
        CalibrationSpec(sources=(Source(str(path)),), windows=100, length=16).feeds(tiny_onnx)


def test_a_text_folder_and_jsonl_read_in_order(tmp_path, tiny_onnx):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "b.txt").write_text("second file " * 4)
    (folder / "a.txt").write_text("first file " * 4)
    (folder / "skip.md").write_text("not read")
    (folder / ".hidden.txt").write_text("not read")
    feeds = CalibrationSpec(sources=(Source(str(folder)),), windows=1, length=60).feeds(tiny_onnx)
    assert _bytes(feeds) == [(("first file " * 4).strip() + "\n\n" + ("second file " * 4).strip()).encode()[:60]]
    write_images(tmp_path / "pictures", 1)
    with pytest.raises(CalibrationError, match=r"pictures: holds no .txt file for 'tiny-llama', a 'causal-lm' model "
                                               r"\(it holds images\)"):
        CalibrationSpec(sources=(Source(str(tmp_path / "pictures")),), windows=1).feeds(tiny_onnx)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"body": "hello there, how are you"}) + "\n\n" + json.dumps({"body": "fine!" * 6}) + "\n")
    feeds = CalibrationSpec(sources=(Source(str(jsonl), field="body"),), windows=1, length=30).feeds(tiny_onnx)
    assert _bytes(feeds) == [b"hello there, how are you\n\nfine"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"txt": "no"}\n', r"chat.jsonl, line 2: has no field 'text' \(fields: \['txt'\]\)"),
    ('{"text": "ok"}\n{"text": 3}\n', r"chat.jsonl, line 2: field 'text' must be a string, got 3"),
    ('{"text": "ok"}\n{"text": "a", "text": "b"}\n', r"chat.jsonl, line 2: key 'text' is given twice"),
    ('{"text": "ok"}\n[1, 2]\n', r"chat.jsonl, line 2 must be an object"),
    ('{"text": "ok"\n', r"chat.jsonl, line 1: not valid JSON"),
])
def test_malformed_jsonl_is_refused_by_line(tmp_path, tiny_onnx, content, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        CalibrationSpec(sources=(Source(str(path)),), windows=1, length=2).feeds(tiny_onnx)


def test_non_utf8_text_and_unknown_files_are_refused_by_name(tmp_path, tiny_onnx):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(CalibrationError, match=r"latin.txt: not UTF-8 text \(byte 3\)"):
        CalibrationSpec(sources=(Source(str(bad)),), windows=1, length=2).feeds(tiny_onnx)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(CalibrationError, match=r"data.csv: unknown calibration source"):
        CalibrationSpec(sources=(Source(str(other)),), windows=1).feeds(tiny_onnx)


def test_sources_mix_by_count_and_weight_interleaved(tmp_path, tiny_onnx):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400)
    b.write_text("b" * 400)
    spec = CalibrationSpec(sources=(Source(str(a)), Source(str(b), weight=2)), windows=6, length=8)
    assert [w[0] for w in _bytes(spec.feeds(tiny_onnx))] == list(b"babbab")
    spec = CalibrationSpec(sources=(Source(str(a), count=1), Source("sample:lee-news")), windows=4, length=8)
    feeds = spec.feeds(tiny_onnx)
    news = lm_windows(None, "calib", 3, 8, corpus="lee-news")
    assert _bytes(feeds) == _bytes([{"input_ids": news[0]}, {"input_ids": np.full((1, 8), 97)}, {"input_ids": news[1]},
                                    {"input_ids": news[2]}])
    with pytest.raises(CalibrationError, match="2 windows cannot be shared by 2 sources after the 1"):
        CalibrationSpec(sources=(Source(str(a), count=1), Source(str(b)), Source(str(b))), windows=2).feeds(tiny_onnx)


def test_text_needs_a_language_model(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx")))
    with pytest.raises(CalibrationError, match=r"source 'sample:lee-news' is text, but 'v' is a 'generic' model"):
        CalibrationSpec(sources=(Source("sample:lee-news"),)).feeds(model)
    with pytest.raises(CalibrationError, match="calibration names no source, and 'v' is a 'generic' model, not a language model"):
        CalibrationSpec().feeds(model)


# ---------------------------------------------------------------------------------- arrays
@pytest.fixture
def vision(tmp_path):
    return graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx")))


def test_npz_and_npy_feeds_cut_along_the_first_axis(tmp_path, vision):
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x)
    feeds = CalibrationSpec(sources=(Source(str(tmp_path / "f.npz")),), windows=5).feeds(vision)
    assert all(np.array_equal(f["x"], x[i:i + 1]) for i, f in enumerate(feeds))
    np.save(tmp_path / "f.npy", x[:, None])  # rank + 1: one feed per index of axis 0
    feeds = CalibrationSpec(sources=(Source(str(tmp_path / "f.npy")),), windows=4).feeds(vision)
    assert len(feeds) == 4 and np.array_equal(feeds[3]["x"], x[3:4])
    held_out = CalibrationSpec(sources=(Source(str(tmp_path / "f.npz"), skip=3),), windows=2).feeds(vision)
    assert [f["x"].tolist() for f in held_out] == [x[3:4].tolist(), x[4:5].tolist()]
    with pytest.raises(CalibrationError, match=r"f.npy: holds 5 feeds, asked for 6"):
        CalibrationSpec(sources=(Source(str(tmp_path / "f.npy")),), windows=6).feeds(vision)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 3, 32, 32), np.float64)}, r"array 'x' is float64, input 'x' takes float32"),
    ({"x": np.zeros((2, 3, 16, 32), np.float32)}, r"array 'x': axis 2 is 16, input 'x' needs 32"),
    ({"x": np.zeros((3, 32, 32), np.float32)}, r"array 'x' has rank 3; input 'x' has rank 4"),
    ({"image": np.zeros((2, 3, 32, 32), np.float32)}, r"'image' is no input"),
    ({}, r"input 'x' has no array"),
])
def test_feed_files_are_checked_against_the_inputs(tmp_path, vision, arrays, message):
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(CalibrationError, match=message):
        CalibrationSpec(sources=(Source(str(tmp_path / "f.npz")),), windows=1).feeds(vision)


def test_pickled_npy_is_refused(tmp_path, vision):
    np.save(tmp_path / "f.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match=r"f.npy: dtype 'object' is not a plain number type"):
        CalibrationSpec(sources=(Source(str(tmp_path / "f.npy")),), windows=1).feeds(vision)


# ---------------------------------------------------------------------------------- images
def test_images_preprocessed_by_the_spec(tmp_path, vision):
    paths = write_images(tmp_path / "images", 3, size=(40, 64))
    spec = ImageSpec(resize="cover", colors="BGR", mean=(0.5,), std=(0.25,))
    feeds = CalibrationSpec(sources=(Source(str(tmp_path / "images")),), windows=3, image=spec).feeds(vision)
    assert [f["x"].shape for f in feeds] == [(1, 3, 32, 32)] * 3 and feeds[0]["x"].dtype == np.float32
    # cover: 40 x 64 scaled to 32 x 51, then the centre 32 columns; BGR; (x / 255 - 0.5) / 0.25
    image = Image.open(paths[1]).convert("RGB").resize((51, 32), Image.BILINEAR).crop((9, 0, 41, 32))
    expected = ((np.asarray(image, np.float32)[..., ::-1] / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(feeds[1]["x"][0], expected, atol=1e-6)
    nhwc = CalibrationSpec(sources=(Source(str(tmp_path / "images")),), windows=1,
                           image=ImageSpec(resize="stretch", scale="byte", layout="NHWC", size=(32, 32)))
    dynamic = graphopt.load(str(tiny_vision_model(tmp_path / "d.onnx", size=None)))
    with pytest.raises(CalibrationError, match=r"input 'x' \[1, 3, 32, 32\] has 32 channels in NHWC; images give 1 or 3"):
        nhwc.feeds(vision)
    with pytest.raises(CalibrationError, match=r"input 'x' \['N', 3, 'H', 'W'\] has a dynamic size; give 'size'"):
        CalibrationSpec(sources=(Source(str(tmp_path / "images")),), windows=1).feeds(dynamic)
    sized = CalibrationSpec(sources=(Source(str(tmp_path / "images")),), windows=2, image=ImageSpec(size=(24, 40)))
    assert sized.feeds(dynamic)[0]["x"].shape == (1, 3, 24, 40)


def test_unreadable_images_and_mixed_folders_are_refused_by_name(tmp_path, vision):
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(CalibrationError, match=r"broken.jpg: not a readable image"):
        CalibrationSpec(sources=(Source(str(tmp_path / "images")),), windows=3).feeds(vision)
    (tmp_path / "images" / "README.txt").write_text("a folder of images may hold a README")
    feeds = CalibrationSpec(sources=(Source(str(tmp_path / "images"), pattern="img*"),), windows=2).feeds(vision)
    assert len(feeds) == 2  # a vision model reads the images, never the .txt; the pattern leaves out broken.jpg
    with pytest.raises(CalibrationError, match=r"images: holds no image .* for 'v', a 'generic' model"):
        CalibrationSpec(sources=(Source(str(tmp_path / "images"), pattern="*.txt"),), windows=1).feeds(vision)
    with pytest.raises(CalibrationError, match=r"img00.png: calibration reads images from a folder"):
        CalibrationSpec(sources=(Source(str(tmp_path / "images" / "img00.png")),), windows=1).feeds(vision)


@pytest.mark.parametrize("value, message", [
    ({"size": [32]}, r"option 'size' must be \[height, width\]"),
    ({"layout": "CHW"}, r"option 'layout' must be one of NCHW, NHWC, got 'CHW'"),
    ({"std": [0.5, 0]}, r"option 'std' must be 1 to 4 numbers > 0"),
    ({"mean": "0.5"}, r"option 'mean' must be a number, got '0.5'"),
    ({"crop": 0.9}, r"unknown option 'crop'"),
])
def test_image_spec_options_are_checked(value, message):
    with pytest.raises(CalibrationError, match=message):
        parse_image_spec(value, "spec.yaml")


# ----------------------------------------------------------------------- recipes and CLI
def test_a_recipe_names_several_sources_beside_it(tmp_path, tiny_onnx):
    (tmp_path / "my.txt").write_text(TEXT)
    text = ("passes: []\ncalibration:\n  windows: 3\n  length: 8\n  sources:\n    - my.txt\n"
            "    - {path: sample:lee-news, count: 1, split: eval}\n")
    recipe = parse_recipe(text, tmp_path / "r.yaml")
    assert recipe.calibration.sources == (Source(str(tmp_path / "my.txt")), Source("sample:lee-news", 1, split="eval"))
    assert len(recipe.calibration_feeds(tiny_onnx)) == 3
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "o.txt").write_text(TEXT)
    with pytest.raises(RecipeError, match=r"r.yaml, line 3: .*leaves the recipe's folder"):
        parse_recipe("passes: []\ncalibration:\n  source: ../elsewhere/o.txt\n", outside.parent / "sub" / "r.yaml")
    for body, line, message in [
        ("  sources: [my.txt, {path: my.txt, colour: red}]\n", 3, "item 2: unknown option 'colour'"),
        ("  source: my.txt\n  sources: [my.txt]\n", 4, "give 'source' or 'sources', not both"),
        ("  source: hub:wikitext\n", 3, "no such file or folder 'hub:wikitext'"),
        ("  source: sample:wiki\n", 3, "unknown corpus 'sample:wiki'"),
        ("  image: {layout: CHW}\n", 3, "option 'layout' must be one of NCHW, NHWC"),
    ]:
        with pytest.raises(RecipeError, match=rf"r.yaml, line {line}: calibration: .*{message}"):
            parse_recipe("passes: []\ncalibration:\n" + body, tmp_path / "r.yaml")


def test_command_line_sources_replace_the_recipes(tmp_path):
    (tmp_path / "my.txt").write_text(TEXT)
    (tmp_path / "spec.yaml").write_text("size: [48, 320]\ncolors: BGR\n")
    recipe = CalibrationSpec(windows=16, length=128, line=4)
    spec = command_line_spec(recipe, [str(tmp_path / "my.txt")], None, 32, "body", str(tmp_path / "spec.yaml"))
    assert spec == CalibrationSpec(sources=(Source(str(tmp_path / "my.txt"), field="body"),), windows=16, length=32,
                                   image=ImageSpec(size=(48, 320), colors="BGR"), line=4)
    assert command_line_spec(recipe) is recipe and command_line_spec(None) is None
    with pytest.raises(CalibrationError, match="need a calibration source"):
        command_line_spec(None, windows=4)
    with pytest.raises(CalibrationError, match=r"--calibration nope.txt: option 'path': no such file or folder"):
        command_line_spec(recipe, ["nope.txt"])
    assert parse_source("sample:lee-news") == Source("sample:lee-news")
