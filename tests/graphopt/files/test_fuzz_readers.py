"""Property-based fuzzing of every reader of user files (issue 18, item 4).

Each test hands one reader a valid file mutated (bits flipped, integers overwritten with hostile
values, bytes cut, inserted or deleted) or a schema-valid file with hostile values (sizes of 2^60,
negative or fractional integers, wrong types, names that climb out of the folder, deep nesting,
YAML aliases and tags), and asserts for every input:

- the reader returns, or raises a GraphoptError whose message is at most 1,000 characters; any
  other exception fails the test (hypothesis then prints the smallest input that raised it);
- nothing is written: the folder holding the input and the working directory (an empty temporary
  folder during the run) are unchanged.

The last test checks the process's peak RSS: under 1 GiB over the fuzz tests. A process's peak
only grows, so it is measurable only where no earlier test ran a large model; `make test` runs this
module in a process of its own for that reason, and a run after heavy tests skips the memory check.

Budgets are hypothesis settings profiles chosen by the environment variable GRAPHOPT_FUZZ:

- "ci" (the default, what `make test` runs): derandomized (the same inputs on every run), no
  example database, `EXAMPLES` per reader: 10,200 generated inputs in all (and 600 for the sensitivity
  reader), about a minute on 2 cores.
- "long": 50 times the examples with fresh random inputs on every run, for a soak before a release:
  `GRAPHOPT_FUZZ=long .venv/bin/python -m pytest -q tests/graphopt/files/test_fuzz_readers.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from graphopt.backends.npu_sim.program import Op, Program, TensorInfo
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.errors import GraphoptError
from graphopt.files.gguf_files import read_gguf_header
from graphopt.files.safetensors_files import read_safetensors
from graphopt.frontends.huggingface import check_gguf, check_hf_folder
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx
from graphopt.quant.encodings import Encodings
from graphopt.recipe import parse_recipe

# hypothesis keeps caches (unicode tables) in a folder of its own: keep it out of the repository
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "graphopt-hypothesis"))
PROFILE = os.environ.get("GRAPHOPT_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"GRAPHOPT_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
EXAMPLES = {"onnx": 2200, "safetensors": 1200, "gguf": 1400, "recipe": 1400, "encodings_v1": 1000,
            "encodings_v0": 1000, "npu_program": 1000, "hf_config": 1000, "sensitivity": 600}
MEASURABLE_START = 512 << 20  # a process whose peak RSS is already above this cannot measure the fuzz tests' own
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", **_COMMON)
SCALE = 50 if PROFILE == "long" else 1
COUNTS: Counter = Counter()
START_RSS: list[int] = []  # the process's peak RSS when the first fuzz test started


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(autouse=True, scope="module")
def _rss_at_start():
    START_RSS.append(_peak_rss())
    yield


def budget(reader: str):
    return settings(settings.get_profile(PROFILE), max_examples=EXAMPLES[reader] * SCALE)


# ------------------------------------------------------------------------------ the harness
ROOT: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def fuzz_root(tmp_path_factory):
    """One folder for every example's input ("in") and an empty working directory ("cwd")."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "in").mkdir()
    (root / "cwd").mkdir()
    previous = os.getcwd()
    os.chdir(root / "cwd")
    ROOT["root"] = root
    try:
        yield root
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def sandbox():
    """The input folder, emptied; after the read it must hold what the example wrote, the working
    directory must still be empty and nothing may have appeared beside them."""
    root = ROOT["root"]
    folder = root / "in"
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    box = {"folder": folder, "before": None}
    yield box
    if box["before"] is not None:
        assert _listing(folder) == box["before"], "the reader wrote into the input's folder"
    assert not os.listdir(root / "cwd"), f"the reader wrote into the working directory: {os.listdir(root / 'cwd')}"
    assert sorted(os.listdir(root)) == ["cwd", "in"], f"the reader wrote beside the input: {os.listdir(root)}"


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((e.name, e.stat(follow_symlinks=False).st_size) for e in os.scandir(folder))


def fuzz_file(reader: str, name: str, data: bytes | str, read) -> None:
    """Write `data` as `name` in a fresh input folder and `expect_clean` the read of it."""
    with sandbox() as box:
        path = box["folder"] / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        expect_clean(reader, box, read, path)


def expect_clean(reader: str, box: dict, read, *args) -> None:
    """Run `read(*args)`: success or a GraphoptError of at most 1,000 characters; count the input."""
    COUNTS[reader] += 1
    box["before"] = _listing(box["folder"])
    try:
        read(*args)
    except GraphoptError as exc:
        assert len(str(exc)) <= 1000, f"{len(str(exc))}-character message: {str(exc)[:300]}"


INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 65535, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32,
                    2 ** 40, 2 ** 60, 2 ** 63 - 1, 2 ** 64 - 1]


@st.composite
def mutated(draw, seed: bytes, max_edits: int = 6) -> bytes:
    """`seed` with a few edits: bit flips, bytes set, little-endian integers overwritten with hostile
    values, a cut, an insertion or a deletion."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "u32", "u64", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind in ("u32", "u64") and len(data) >= 8:
            size = 4 if kind == "u32" else 8
            value = draw(st.sampled_from(INTERESTING_INTS)) % (1 << (8 * size))
            at = min(at, len(data) - size)
            data[at:at + size] = value.to_bytes(size, "little")
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def hostile_scalars():
    return st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2 ** 70), 2 ** 70),
                     st.sampled_from([-1, -127.6, 8.7, 0.0, -0.0, 1e308, 1e-320, True, False, None, "", "8",
                                      "false", "True", "x" * 5000, "../x", "/etc/passwd", "\0", "\u202e"]),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


def hostile_json():
    return st.recursive(hostile_scalars(),
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)


def nested_text(depth_range=(60, 50000)):
    return st.builds(lambda depth, open_: open_ * depth, st.integers(*depth_range), st.sampled_from(["[", '{"a":']))


def json_text(valid: dict):
    """Text of `valid` mutated, or deeply nested, or with a value swapped for a hostile one."""
    return st.one_of(mutated(json.dumps(valid).encode()), nested_text(),
                     st.builds(lambda path_value: json.dumps(_replace(valid, *path_value)).encode(),
                               st.tuples(st.lists(st.integers(0, 12), min_size=1, max_size=4), hostile_json())))


def _replace(data, path: list[int], value):
    """`data` (a copy) with the value reached by `path` (indices into keys / items) set to `value`."""
    data = json.loads(json.dumps(data))
    target = data
    for step, index in enumerate(path):
        keys = list(target) if isinstance(target, dict) else list(range(len(target))) if isinstance(target, list) else []
        if not keys:
            break
        key = keys[index % len(keys)]
        if step == len(path) - 1 or not isinstance(target[key], (dict, list)):
            target[key] = value
            break
        target = target[key]
    return data


# ----------------------------------------------------------------------------------- ONNX
def _seed_onnx() -> tuple[bytes, bytes]:
    """A model with every place a tensor can sit: an external initializer, an inline one, a
    Constant node, an If branch with its own initializer, a sparse initializer, graphopt.meta."""
    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    inner = numpy_helper.from_array(np.ones(4, np.float32), "inner")
    then = helper.make_graph([helper.make_node("Add", ["x", "inner"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])], initializer=[inner])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0], np.float32), "s"),
                                       numpy_helper.from_array(np.array([2], np.int64), "s_i"), [4])
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(
                 np.array([1, 2, 3, 4], np.float32), "cv")),
             helper.make_node("Add", ["x", "w"], ["a"], name="add_w"),
             helper.make_node("Add", ["a", "c"], ["b"], name="add_c"),
             helper.make_node("Add", ["b", "s"], ["d"], name="add_s"),
             helper.make_node("If", ["cond"], ["y0"], name="if0", then_branch=then, else_branch=other),
             helper.make_node("Add", ["d", "y0"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[weight], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.metadata_props.add(key="graphopt.meta", value=json.dumps({"encodings": {}, "pruning": [], "masks": {}}))
    return model.SerializeToString(), np.arange(4, dtype=np.float32).tobytes()


ONNX_SEED, ONNX_DATA = _seed_onnx()
LOCATIONS = ["w.bin", "../w.bin", "/etc/passwd", "", "sub", "link", "w.bin\0x", "./w.bin", "sub/../../w.bin"]


@st.composite
def hostile_onnx(draw) -> bytes:
    """The seed model with schema-valid but hostile edits to one tensor, node or the metadata."""
    model = onnx.ModelProto.FromString(ONNX_SEED)
    then = next(a.g for a in model.graph.node[4].attribute if a.name == "then_branch")
    tensors = [model.graph.initializer[0], model.graph.node[0].attribute[0].t, then.initializer[0],
               model.graph.sparse_initializer[0].values, model.graph.sparse_initializer[0].indices]
    tensor = draw(st.sampled_from(tensors))
    edit = draw(st.sampled_from(["dims", "type", "external", "raw", "input", "output", "meta", "sparse_dims"]))
    if edit == "dims":
        tensor.ClearField("dims")
        tensor.dims.extend(draw(st.lists(st.sampled_from([0, 1, 2, 4, 5, -1, 2 ** 28, 2 ** 40, 2 ** 62]), max_size=4)))
    elif edit == "type":
        tensor.data_type = draw(st.integers(0, 40))
    elif edit == "external":
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "bogus"]), max_size=4)):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = draw(st.sampled_from(LOCATIONS) if key == "location" else
                               st.sampled_from(["0", "4", "16", "-1", "1e3", "99999999999", "x", "", "0x10"]))
    elif edit == "raw":
        tensor.raw_data = tensor.raw_data[:draw(st.integers(0, 32))] + draw(st.binary(max_size=8))
    elif edit == "input":
        node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(["ghost", "y", "b", "x", ""]))
    elif edit == "output":
        node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
        node.output[0] = draw(st.sampled_from(["a", "x", "y", "w", "b", "d"]))
    elif edit == "meta":
        model.metadata_props[0].value = draw(st.one_of(
            st.builds(json.dumps, hostile_json()), nested_text(), st.text(max_size=20)))
    else:
        sparse = model.graph.sparse_initializer[0]
        sparse.ClearField("dims")
        sparse.dims.extend(draw(st.lists(st.sampled_from([0, 1, 4, -2, 2 ** 40]), max_size=3)))
    return model.SerializeToString()


def _load_onnx_model(path: Path) -> None:
    """What graphopt.load does with an .onnx file: the reader, then the Model handle over it."""
    Model.from_onnx(load_onnx(path), source=path)


@budget("onnx")
@given(data=st.one_of(mutated(ONNX_SEED), hostile_onnx()), external=st.one_of(st.just(ONNX_DATA), mutated(ONNX_DATA)),
       layout=st.sampled_from(["file", "folder", "symlink", "hardlink", "none"]))
def test_fuzz_onnx(data, external, layout):
    with sandbox() as box:
        folder = box["folder"]
        (folder / "model.onnx").write_bytes(data)
        outside = folder.parent / "outside.bin"
        if layout == "file":
            (folder / "w.bin").write_bytes(external)
        elif layout == "folder":
            (folder / "w.bin").mkdir()
        elif layout in ("symlink", "hardlink"):
            outside.write_bytes(external)
            (folder / "w.bin").symlink_to(outside) if layout == "symlink" else os.link(outside, folder / "w.bin")
        (folder / "link").symlink_to("/etc/hostname")
        try:
            expect_clean("onnx", box, _load_onnx_model, folder / "model.onnx")
        finally:
            if outside.exists():
                outside.unlink()


# ---------------------------------------------------------------------------- safetensors
def _seed_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
                   "c": np.ones(3, np.float16), "d": np.array([True, False])}, f"{tmp}/s.safetensors",
                  metadata={"format": "pt"})
        return Path(f"{tmp}/s.safetensors").read_bytes()


SAFETENSORS_SEED = _seed_safetensors()


@st.composite
def hostile_safetensors(draw) -> bytes:
    """A header of schema-shaped entries with hostile dtypes, shapes and offsets, and some data."""
    entries = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True)):
        entries[name] = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "Q4", "", 7])),
                         "shape": draw(st.lists(st.sampled_from([0, 1, 2, 3, -1, 2 ** 40, 2 ** 63, 1.5]), max_size=3)),
                         "data_offsets": draw(st.lists(st.sampled_from([0, 4, 8, 12, 24, -8, 2 ** 64]), max_size=3))}
    if draw(st.booleans()):
        entries["__metadata__"] = draw(hostile_json())
    header = json.dumps(entries).encode()
    claimed = draw(st.one_of(st.just(len(header)), st.sampled_from(INTERESTING_INTS)))
    return struct.pack("<Q", claimed % (1 << 64)) + header + draw(st.binary(max_size=64))


@budget("safetensors")
@given(data=st.one_of(mutated(SAFETENSORS_SEED), hostile_safetensors()))
def test_fuzz_safetensors(data):
    fuzz_file("safetensors", "w.safetensors", data, read_safetensors)


# ----------------------------------------------------------------------------------- GGUF
GGUF_METADATA = [("uint32", "llama.block_count", 2), ("uint32", "llama.embedding_length", 8),
                 ("uint32", "llama.attention.head_count", 2), ("uint32", "llama.attention.head_count_kv", 1),
                 ("uint32", "llama.feed_forward_length", 16), ("float32", "llama.rope.freq_base", 10000.0),
                 ("bool", "tokenizer.ggml.add_bos_token", True), ("array", "tokenizer.ggml.tokens", ["a", "b", "c"]),
                 ("array", "tokenizer.ggml.scores", [0.0, 1.0, 2.0])]
GGUF_TENSORS = {"token_embd.weight": np.zeros((4, 8), np.float32), "blk.0.attn_q.weight": np.zeros((8, 8), np.float16),
                "blk.1.attn_q.weight": np.zeros((8, 8), np.float16)}


def _seed_gguf() -> bytes:
    """A small llama GGUF: every scalar kind the header parser meets, string and float arrays, tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = gguf.GGUFWriter(f"{tmp}/m.gguf", "llama")
        for kind, key, value in GGUF_METADATA:
            getattr(writer, f"add_{kind}")(key, value)
        for name, array in GGUF_TENSORS.items():
            writer.add_tensor(name, array)
        for step in ("write_header_to_file", "write_kv_data_to_file", "write_tensors_to_file", "close"):
            getattr(writer, step)()
        return Path(f"{tmp}/m.gguf").read_bytes()


GGUF_SEED = _seed_gguf()


@st.composite
def hostile_gguf(draw) -> bytes:
    """A header with hostile counts, value types, string lengths and tensor infos."""
    def string(text: bytes, claimed=None) -> bytes:
        return struct.pack("<Q", (len(text) if claimed is None else claimed) % (1 << 64)) + text

    out = b"GGUF" + struct.pack("<I", draw(st.sampled_from([3, 2, 1, 4, 2 ** 32 - 1])))
    kvs, tensors = draw(st.lists(st.tuples(st.binary(max_size=12), st.integers(0, 15), st.binary(max_size=24),
                                           st.one_of(st.none(), st.sampled_from(INTERESTING_INTS))), max_size=4)), \
        draw(st.lists(st.tuples(st.binary(max_size=12), st.integers(0, 9),
                                st.lists(st.sampled_from(INTERESTING_INTS), max_size=4), st.integers(0, 40),
                                st.sampled_from(INTERESTING_INTS)), max_size=3))
    out += struct.pack("<QQ", draw(st.one_of(st.just(len(tensors)), st.sampled_from(INTERESTING_INTS))) % (1 << 64),
                       draw(st.one_of(st.just(len(kvs)), st.sampled_from(INTERESTING_INTS))) % (1 << 64))
    for key, kind, payload, claimed in kvs:
        out += string(key) + struct.pack("<I", kind)
        out += string(payload, claimed) if kind == 8 else payload
    for name, dims_claimed, dims, kind, offset in tensors:
        out += string(name) + struct.pack("<I", dims_claimed)
        out += b"".join(struct.pack("<Q", d % (1 << 64)) for d in dims) + struct.pack("<IQ", kind, offset % (1 << 64))
    return out + draw(st.binary(max_size=64))


def _read_gguf(path: Path) -> None:
    read_gguf_header(path)
    check_gguf(path)


@budget("gguf")
@given(data=st.one_of(mutated(GGUF_SEED), hostile_gguf()))
def test_fuzz_gguf_header(data):
    fuzz_file("gguf", "m.gguf", data, _read_gguf)


# --------------------------------------------------------------------------------- recipes
RECIPE_SEED = """\
passes:
  - cleanup
  - prune_structure: {ffn_ratio: 0.25, importance: scores, scores: scores.json}
  - quantize:
      weight_bits: 8
      activation_bits: 8
      int16_inputs: ["*.mlp.down_proj.weight"]
  - fold_encodings: {encodings: enc.json, strict: true}
backend: {name: npu-sim, seq_len: 32}
calibration:
  windows: 4
  length: 64
"""
PASS_OPTIONS = {"cleanup": ["fold_constants", "fold_size_limit", "remove_identities"],
                "prune_structure": ["heads", "ffn_ratio", "importance", "scores", "layer_ratios", "schedule"],
                "quantize": ["weight_bits", "activation_bits", "int16_budget", "sensitivity", "exclude",
                             "weight_granularity", "percentile"],
                "fold_encodings": ["encodings", "strict"], "nm_sparsity": ["pattern", "ratio"],
                "rotate": [], "bogus_pass": ["x"]}
YAML_BITS = ["&a ", "*a", "!!python/object:os.system ", "!tag ", "\0", "\t", "<<: *a", "{", "}", "[", "]", "- ",
             ": ", "'", '"', "|\n", ">\n", "#", "%YAML 1.1\n", "---\n", "...\n", "? ", "\ufeff", "\x85", "@", "`"]


@st.composite
def hostile_recipe(draw) -> str:
    """A recipe-shaped document: real and bogus passes with hostile option values, backends, calibration."""
    passes = []
    for name in draw(st.lists(st.sampled_from(sorted(PASS_OPTIONS)), max_size=4)):
        keys = draw(st.lists(st.sampled_from(PASS_OPTIONS[name] or ["x"]), max_size=3, unique=True))
        passes.append({name: {k: draw(hostile_json()) for k in keys}} if keys else name)
    doc = {"passes": passes}
    if draw(st.booleans()):
        doc["backend"] = draw(st.one_of(st.sampled_from(["npu-sim", "qnn", "nope"]), st.fixed_dictionaries(
            {"name": st.sampled_from(["npu-sim", "qnn"])}, optional={"batch": hostile_scalars(),
                                                                      "seq_len": hostile_scalars()})))
    if draw(st.booleans()):
        doc["calibration"] = draw(st.dictionaries(st.sampled_from(["windows", "length", "split", "source", "x"]),
                                                  hostile_scalars(), max_size=3))
    return json.dumps(doc)  # JSON is YAML


@st.composite
def mutated_recipe(draw) -> str:
    text = RECIPE_SEED
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(YAML_BITS)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 12)):]
    return text


@budget("recipe")
@given(text=st.one_of(mutated_recipe(), hostile_recipe(), nested_text()))
def test_fuzz_recipe_yaml(text):
    fuzz_file("recipe", "r.yaml", text, lambda path: parse_recipe(text, path))


# ------------------------------------------------------------------------------ encodings
V1_SEED = {"version": "1.0.0",
           "activation_encodings": [{"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
                                     "scale": [0.1], "offset": [-128]}],
           "param_encodings": [{"name": "w", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
                                "scale": [0.1, 0.2], "offset": [-128, -128], "axis": 1},
                               {"name": "b", "dtype": "INT", "enc_type": "PER_BLOCK", "bw": 4, "is_sym": True,
                                "scale": [0.1, 0.2], "offset": [-8, -8], "axis": 0, "block_size": 32}]}
V0_SEED = {"version": "0.6.1",
           "activation_encodings": {"x": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "min": -1.0,
                                           "max": 1.0}]},
           "param_encodings": {"w": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "scale": 0.1,
                                      "offset": -128, "min": -12.8, "max": 12.7},
                                     {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "scale": 0.2,
                                      "offset": -128}]}}


@budget("encodings_v1")
@given(data=json_text(V1_SEED))
def test_fuzz_encodings_v1(data):
    fuzz_file("encodings_v1", "e.json", data, Encodings.read)


@budget("encodings_v0")
@given(data=json_text(V0_SEED))
def test_fuzz_encodings_v0(data):
    fuzz_file("encodings_v0", "e.json", data, Encodings.read)


# ---------------------------------------------------------------------------- sensitivity
SENSITIVITY_SEED = {"model": "m", "metric": "kl", "ranking": [
    {"point": "x", "kind": "activation", "drop": 0.5, "feeds": ["w"]},
    {"point": "w", "kind": "weight", "drop": 0.1, "feeds": []}]}


def _read_sensitivity(path: Path) -> None:
    from graphopt.analysis.sensitivity import read_sensitivity

    read_sensitivity(str(path), "quantize")


@budget("sensitivity")
@given(data=json_text(SENSITIVITY_SEED))
def test_fuzz_sensitivity_json(data):
    fuzz_file("sensitivity", "s.json", data, _read_sensitivity)


# ----------------------------------------------------------------------------- npu-sim
def _seed_program() -> tuple[bytes, bytes]:
    table = (np.arange(256) // 2 - 64).astype(np.int8)
    program = Program(
        name="halve", inputs=["x"], outputs=["y"], output_names=["y"],
        ops=[Op("lut", "npu", "halve", ["x"], ["m"], {"offset": -128}, {"table": "t"}),
             Op("reshape", "npu", "flat", ["m"], ["y"], {"shape": [4]})],
        tensors={"x": TensorInfo("x", "int8", [1, 4], 0.1, 0), "m": TensorInfo("m", "int8", [1, 4], 0.2, 0),
                 "y": TensorInfo("y", "int8", [4], 0.2, 0)},
        constants={"t": table}, meta={"example_inputs": {"x": [[-128, -1, 0, 127]]}})
    with tempfile.TemporaryDirectory() as tmp:
        program.save(tmp)
        return Path(tmp, "program.json").read_bytes(), Path(tmp, "weights.npz").read_bytes()


PROGRAM_SEED, WEIGHTS_SEED = _seed_program()


def _run_program(folder: Path) -> None:
    program = Program.load(folder)
    examples = program.meta.get("example_inputs", {})
    Simulator(program).run({k: np.array(v) for k, v in examples.items()})


@budget("npu_program")
@given(program=json_text(json.loads(PROGRAM_SEED)), weights=st.one_of(st.just(WEIGHTS_SEED), mutated(WEIGHTS_SEED)))
def test_fuzz_npu_program(program, weights):
    with sandbox() as box:
        (box["folder"] / "program.json").write_bytes(program if isinstance(program, bytes) else program.encode())
        (box["folder"] / "weights.npz").write_bytes(weights)
        expect_clean("npu_program", box, _run_program, box["folder"])


# ------------------------------------------------------------------------ HF config.json
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 4,
             "head_dim": 4, "rope_scaling": {"type": "linear", "factor": 2.0}}


def _hf_weights() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"model.embed_tokens.weight": np.zeros((4, 8), np.float32),
                   "model.layers.0.mlp.up_proj.weight": np.zeros((16, 8), np.float32),
                   "model.layers.1.mlp.up_proj.weight": np.zeros((16, 8), np.float32)}, f"{tmp}/m.safetensors")
        return Path(f"{tmp}/m.safetensors").read_bytes()


HF_WEIGHTS = _hf_weights()
INDEX_SEED = {"metadata": {"total_size": 1152}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}


@budget("hf_config")
@given(config=json_text(HF_CONFIG), index=st.one_of(st.none(), json_text(INDEX_SEED)))
def test_fuzz_hf_config(config, index):
    with sandbox() as box:
        folder = box["folder"]
        (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
        (folder / "model.safetensors").write_bytes(HF_WEIGHTS)
        if index is not None:
            (folder / "model.safetensors.index.json").write_bytes(index if isinstance(index, bytes) else index.encode())
        expect_clean("hf_config", box, check_hf_folder, folder)


# ------------------------------------------------------------------------------ the budget
def test_fuzz_budget_and_peak_memory():
    """Runs last: every reader got its examples, 10,000+ without an unexpected exception, and the
    peak RSS of the fuzz tests stayed under 1 GiB."""
    if any(COUNTS[name] < EXAMPLES[name] * SCALE for name in EXAMPLES):
        pytest.skip(f"runs after the fuzz tests of this module (examples so far: {dict(COUNTS)})")
    assert sum(COUNTS.values()) >= 10_000 * SCALE, COUNTS
    peak = _peak_rss()
    print(f"fuzz ({PROFILE}): {sum(COUNTS.values()):,} inputs {dict(COUNTS)}; peak RSS {peak >> 20} MiB")
    if START_RSS[0] >= MEASURABLE_START:
        pytest.skip(f"peak RSS not measurable here: earlier tests in this process reached {START_RSS[0] >> 20} MiB "
                    "before fuzzing (make test runs this module in a process of its own)")
    assert peak < 1 << 30, f"peak RSS {peak >> 20} MiB while fuzzing"
