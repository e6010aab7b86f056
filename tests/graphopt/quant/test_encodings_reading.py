"""Encodings files through the reading boundary (issue 18): nothing misread silently (strict bools
and integers, one encoding per tensor, 0.6.1 channels that agree), no bomb, no traceback."""

import json
import os
import time

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.quant.encodings import EncodingError, Encodings


def _v1(**entry) -> dict:
    base = {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [0.1],
            "offset": [-128]}
    return {"version": "1.0.0", "activation_encodings": [{**base, **entry}], "param_encodings": []}


def _v0(*channels, name="w") -> dict:
    return {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {name: list(channels)}}


def _channel(**fields) -> dict:
    return {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "scale": 0.1, "offset": -128, **fields}


def _refused(tmp_path, data, *words, text: str | None = None):
    """Encodings.read refuses the file with an EncodingError naming it and every word; nothing is written."""
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(data).replace("Infinity", "1e999") if text is None else text)  # 1e999: inf
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(EncodingError) as info:
        Encodings.read(path)
    message = str(info.value)
    assert str(path) in message and len(message) < 600, message
    for word in words:
        assert word in message, message
    assert sorted(os.listdir(tmp_path)) == before
    return message


def test_is_sym_string_false_is_refused_not_read_as_true(tmp_path):
    _refused(tmp_path, _v1(is_sym="false"), "entry 'x'", "'is_sym' must be true or false, got 'false'")
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_v1(is_sym=False, offset=[-130])))
    encoding = Encodings.read(path)["x"]
    assert not encoding.is_symmetric and encoding.zero_point().tolist() == [130]  # uint8 zero point 130


def test_duplicate_names_are_refused(tmp_path):
    data = _v1()
    data["activation_encodings"].append(dict(data["activation_encodings"][0], scale=[0.2]))
    _refused(tmp_path, data, "activation_encodings", "tensor 'x' is encoded twice")
    data = _v1()
    data["param_encodings"] = [dict(data["activation_encodings"][0])]
    _refused(tmp_path, data, "param_encodings", "'x' is encoded twice (first in activation_encodings)")
    text = '{"version": "0.6.1", "activation_encodings": {}, "param_encodings": {"w": [%s], "w": [%s]}}' % (
        json.dumps(_channel()), json.dumps(_channel(scale=0.2)))
    _refused(tmp_path, None, "key 'w' is given twice", text=text)


@pytest.mark.parametrize("second, words", [
    (_channel(bitwidth=4, offset=-8), ["entry 'w'", "channels disagree", "int 4-bit", "int 8-bit"]),
    (_channel(is_symmetric="True"), ["entry 'w'", "channels disagree", "symmetric"]),
])
def test_v0_per_channel_entries_must_agree(tmp_path, second, words):
    _refused(tmp_path, _v0(_channel(), second), *words)


@pytest.mark.parametrize("data, words", [
    (_v1(bw=8.7), ["entry 'x'", "'bw' must be an integer, got 8.7"]),
    (_v1(offset=[-127.6]), ["entry 'x'", "offset 0 must be an integer, got -127.6"]),
    (_v1(bw=1e999), ["entry 'x'", "'bw' must be an integer, got inf"]),
    (_v1(offset=[-(10 ** 30)]), ["entry 'x'", "offset 0 must be in [-255, 0]"]),
    (_v0(_channel(bitwidth=8.7)), ["entry 'w'", "'bitwidth' must be an integer, got 8.7"]),
    (_v0(_channel(offset=-127.6)), ["entry 'w'", "'offset' must be an integer, got -127.6"]),
    (_v0(_channel(is_symmetric="yes")), ["entry 'w'", "'is_symmetric'", "'yes'"]),
    (_v1(scale=["0.1"]), ["entry 'x'", "scale 0 must be a number, got '0.1'"]),
    (_v1(name=""), ["'name' must not be empty"]),
    (_v1(dtype=["INT"]), ["entry 'x'", "'dtype' must be a string"]),
])
def test_no_truncation_or_coercion(tmp_path, data, words):
    _refused(tmp_path, data, *words)


def test_bitwidth_ten_billion_is_refused_before_computing_two_to_the_bitwidth(tmp_path):
    start = time.perf_counter()
    channel = {"bitwidth": 10 ** 10, "dtype": "int", "is_symmetric": "False", "min": -1.0, "max": 1.0}
    _refused(tmp_path, _v0(channel), "entry 'w'", "'bitwidth': an int encoding's bitwidth must be 4 or 8 or 16, got 10000000000")
    assert time.perf_counter() - start < 1


def test_v0_min_equal_max_is_an_error_not_a_division(tmp_path):
    channel = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "min": 0.5, "max": 0.5}
    _refused(tmp_path, _v0(channel), "entry 'w'", "leave no range")


def test_v0_min_max_only_still_reads(tmp_path):
    path = tmp_path / "mm.json"
    path.write_text(json.dumps(_v0({"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "min": -1.0, "max": 1.55})))
    encoding = Encodings.read(path)["w"]
    np.testing.assert_allclose(encoding.scale, [2.55 / 255], rtol=1e-6)
    assert encoding.offset.tolist() == [-100]


def test_v0_accepts_json_bools_and_aimet_strings(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_v0(_channel(is_symmetric=True, offset=-128), _channel(is_symmetric="True"))))
    assert Encodings.read(path)["w"].is_symmetric


def test_deep_nesting_and_huge_files_are_refused_before_parsing(tmp_path):
    _refused(tmp_path, None, "nested more than", text="[" * 200000 + "]" * 200000)
    path = tmp_path / "enc.json"
    with open(path, "wb") as fh:
        fh.truncate(1 << 33)
    with pytest.raises(EncodingError, match="more than"):
        Encodings.read(path)
    assert issubclass(EncodingError, GraphoptError)
