"""graphopt.files.reading: the bounded readers every loader uses (JSON, YAML, npz, typed fields, paths)."""

import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from graphopt.errors import GraphoptError, ModelLoadError, UnsafePathError
from graphopt.files.reading import (
    MAX_ECHO,
    YamlDocument,
    capped,
    confined_path,
    parse_json,
    read_json,
    read_npz,
    read_yaml,
    shown,
    want_bool,
    want_int,
    want_number,
)
from graphopt.files.safetensors_files import read_safetensors

ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("text, words", [
    ("[" * 100000 + "]" * 100000, ["nested more than 64"]),
    ("[" * 65 + "]" * 65, ["nested more than 64"]),
    ('{"a": 1, "a": 2}', ["key 'a' is given twice"]),
    ('{"a": NaN}', ["NaN is not JSON"]),
    ('{"a": -Infinity}', ["-Infinity is not JSON"]),
    ("9" * 5000, ["not valid JSON"]),
    ('{"a": 1', ["not valid JSON (line 1"]),
    (b"\xff\xfe", ["not UTF-8"]),
])
def test_json_is_strict_and_bounded(text, words):
    with pytest.raises(ModelLoadError) as info:
        parse_json(text, where="f.json", error=ModelLoadError)
    message = str(info.value)
    assert message.startswith("f.json: ") and len(message) < 300, message
    for word in words:
        assert word in message


def test_json_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as fh:
        fh.truncate(1 << 32)
    tracemalloc.start()
    with pytest.raises(ModelLoadError, match="big.json: 4,294,967,296 bytes, more than"):
        read_json(path, max_bytes=1 << 20, error=ModelLoadError)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    with pytest.raises(ModelLoadError, match="is a folder"):
        read_json(tmp_path, max_bytes=1 << 20, error=ModelLoadError)
    with pytest.raises(ModelLoadError, match="no such JSON file"):
        read_json(tmp_path / "none.json", max_bytes=1 << 20, error=ModelLoadError)


def test_typed_fields_never_coerce():
    assert want_int(8, "bw", ModelLoadError) == 8 and want_int(8.0, "bw", ModelLoadError) == 8
    for value in (8.7, -127.6, True, "8", None, float("nan"), [8]):
        with pytest.raises(ModelLoadError, match="bw must be an integer"):
            want_int(value, "bw", ModelLoadError)
    with pytest.raises(ModelLoadError, match=r"bw must be in \[4, 16\], got 10000000000"):
        want_int(10 ** 10, "bw", ModelLoadError, lo=4, hi=16)
    assert want_bool(False, "sym", ModelLoadError) is False
    for value in ("false", "False", 0, 1, None):
        with pytest.raises(ModelLoadError, match="sym must be true or false"):
            want_bool(value, "sym", ModelLoadError)
    for value in (float("inf"), "1.0", True, 10 ** 400):
        with pytest.raises(ModelLoadError, match="scale"):
            want_number(value, "scale", ModelLoadError)


def test_echoed_values_are_cut_short():
    assert len(shown("x" * 10 ** 6)) <= MAX_ECHO and len(shown(list(range(10 ** 5)))) <= MAX_ECHO
    assert len(capped("a" * 10 ** 6)) <= 600


def test_yaml_alias_bomb_is_refused_quickly_in_one_short_line():
    assert len(ALIAS_BOMB) < 450
    tracemalloc.start()
    with pytest.raises(ModelLoadError) as info:
        YamlDocument(ALIAS_BOMB, "r.yaml", ModelLoadError)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20 and len(str(info.value)) < 200
    assert "r.yaml, line" in str(info.value) and "expands" in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("a: 1\nb: \0\n", ["r.yaml, line 2", "'\\x00' is not allowed"]),
    ("a: !!python/object/apply:os.system [echo hi]\n", ["r.yaml, line 1", "python/object/apply:os.system"]),
    ("a: !custom 3\n", ["r.yaml, line 1", "!custom"]),
    ("a: &x [*x]\n", ["r.yaml, line 1", "refers to the value that holds it"]),
    ("[" * 5000 + "]" * 5000, ["r.yaml", "nest"]),
    ("a: [1, 2\n", ["r.yaml, line 2", "not valid YAML"]),
    ("a: 2001-13-45\n", ["r.yaml, line 1", "cannot read the value"]),
])
def test_yaml_reader_errors_name_file_and_line(text, words):
    with pytest.raises(ModelLoadError) as info:
        document = YamlDocument(text, "r.yaml", ModelLoadError)
        document.value(document.root)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_read_yaml_plain_data_and_size(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: npu\nmacs: 4096\n")
    assert read_yaml(path, max_bytes=1 << 10, error=ModelLoadError) == {"name": "npu", "macs": 4096}
    path.write_text("x" * 2000)
    with pytest.raises(ModelLoadError, match="more than the 1,024"):
        read_yaml(path, max_bytes=1 << 10, error=ModelLoadError)


def test_confined_path(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ok.bin").write_bytes(b"1")
    (tmp_path / "secret").write_bytes(b"s")
    (tmp_path / "m" / "out").symlink_to(tmp_path / "secret")
    (tmp_path / "m" / "sub").mkdir()
    assert confined_path(tmp_path / "m", "ok.bin", who="w") == (tmp_path / "m" / "ok.bin").resolve()
    for name, words in (("../secret", "leaves the folder"), (str(tmp_path / "secret"), "leaves the folder"),
                        ("out", "outside the folder"), ("sub/../../secret", "leaves"), ("", "no usable path")):
        with pytest.raises(UnsafePathError, match=words):
            confined_path(tmp_path / "m", name, who="w")
    with pytest.raises(ModelLoadError, match="'sub' is a folder"):
        confined_path(tmp_path / "m", "sub", who="w", missing=ModelLoadError)
    with pytest.raises(ModelLoadError, match="'gone.bin' is missing"):
        confined_path(tmp_path / "m", "gone.bin", who="w", missing=ModelLoadError)
    (tmp_path / "m" / "loop").symlink_to("loop")
    with pytest.raises(ModelLoadError, match="'loop' cannot be resolved: .*[Ss]ymlink loop"):
        confined_path(tmp_path / "m", "loop", who="w", missing=ModelLoadError)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_read_npz_reads_plain_arrays_and_refuses_pickles_and_bombs(tmp_path):
    path = _npz(tmp_path / "a.npz", a=np.arange(6).reshape(2, 3), f=np.asfortranarray(np.ones((2, 3))))
    arrays = read_npz(path, max_bytes=1 << 20, error=ModelLoadError)
    np.testing.assert_array_equal(arrays["a"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(arrays["f"], np.ones((2, 3)))
    _npz(tmp_path / "o.npz", o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelLoadError, match="array 'o': dtype 'object'"):
        read_npz(tmp_path / "o.npz", max_bytes=1 << 20, error=ModelLoadError)
    np.savez_compressed(tmp_path / "bomb.npz", z=np.zeros(1 << 27, np.uint8))  # 128 MiB from ~130 KB
    tracemalloc.start()
    with pytest.raises(ModelLoadError, match="unpack to"):
        read_npz(tmp_path / "bomb.npz", max_bytes=1 << 40, error=ModelLoadError)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()
    (tmp_path / "junk.npz").write_bytes(os.urandom(300))
    with pytest.raises(ModelLoadError, match="junk.npz: not a readable .npz"):
        read_npz(tmp_path / "junk.npz", max_bytes=1 << 20, error=ModelLoadError)


def test_read_npz_refuses_a_header_claiming_more_than_is_stored(tmp_path):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(4, np.float32))
    raw = buffer.getvalue().replace(b"(4,)", b"(9999999999,)".ljust(4))
    header = raw[:raw.index(b"\n") + 1]
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("x.npy", header + b"\0" * 16)
    with pytest.raises(ModelLoadError, match="array 'x': shape"):
        read_npz(tmp_path / "lie.npz", max_bytes=1 << 20, error=ModelLoadError)


def test_read_safetensors_matches_the_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64),
              "c": np.zeros((0, 3), np.float16)}
    save_file(arrays, str(tmp_path / "w.safetensors"))
    mine, theirs = read_safetensors(tmp_path / "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))
    assert set(mine) == set(theirs) and all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    assert issubclass(UnsafePathError, GraphoptError)
