"""npu-sim programs and inputs through the reading boundary (issue 18): malformed program.json,
weights.npz or feeds are BackendErrors naming the file and the entry; batch and seq_len are bounded."""

import json
import os
import zipfile

import numpy as np
import pytest

from graphopt.backends.npu_sim import NpuSim
from graphopt.backends.npu_sim.program import Op, Program, TensorInfo
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.cli import main
from graphopt.errors import BackendError, OptionError
from graphopt.files.writing import OutputSet

TABLE = (np.arange(256) // 2 - 64).astype(np.int8)  # y = x // 2 over int8, as a lookup table


def small_program() -> Program:
    """x (int8 [1, 4]) -> lut -> y: one integer kernel and one constant."""
    return Program(
        name="halve", inputs=["x"], outputs=["y"], output_names=["y"],
        ops=[Op("lut", "npu", "halve_node", ["x"], ["y"], {"offset": -128}, {"table": "t"})],
        tensors={"x": TensorInfo("x", "int8", [1, 4], 0.1, 0), "y": TensorInfo("y", "int8", [1, 4], 0.2, 0)},
        constants={"t": TABLE}, meta={"example_inputs": {"x": [[-128, -1, 0, 127]]}})


def _saved(tmp_path, program: Program | None = None):
    folder = tmp_path / "npu"
    folder.mkdir(exist_ok=True)
    (program or small_program()).save(folder)
    return folder


def _edit(folder, change):
    data = json.loads((folder / "program.json").read_text())
    change(data)
    (folder / "program.json").write_text(json.dumps(data))


def _refused(folder, *words, error=BackendError):
    before = sorted(os.listdir(folder))
    with pytest.raises(error) as info:
        Simulator(Program.load(folder)).run({"x": np.zeros((1, 4), np.int8)})
    message = str(info.value)
    assert len(message) < 600, message
    for word in words:
        assert word in message, message
    assert sorted(os.listdir(folder)) == before
    return message


def test_a_well_formed_program_loads_and_runs(tmp_path):
    program = Program.load(_saved(tmp_path))
    out = Simulator(program).run({"x": np.array([[-128, -1, 0, 127]], np.int8)})[0]
    np.testing.assert_array_equal(out, [[-64, -1, 0, 63]])


def _set(path: list, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


@pytest.mark.parametrize("change, words", [
    (_set(["ops"], {"0": 1}), ["program.json: 'ops' must be a list"]),
    (_set(["ops", 0, "unit"], "gpu"), ["op #0", "'halve_node'", "'unit' must be 'npu' or 'host'"]),
    (_set(["ops", 0, "color"], "red"), ["op #0", "unknown field 'color'"]),
    (_set(["ops", 0, "inputs"], ["ghost"]), ["op 'halve_node' reads 'ghost'"]),
    (_set(["ops", 0, "params"], {"table": "nothing"}), ["weights.npz", "constant 'nothing'", "'halve_node'"]),
    (_set(["ops", 0, "outputs"], ["z"]), ["program output 'y' is made by no op"]),
    (_set(["tensors", "x", "dtype"], "object"), ["tensor 'x'", "'dtype' must be one of"]),
    (_set(["tensors", "x", "shape"], [10 ** 9, 10 ** 9]), ["tensor 'x'", "elements", "batch or seq_len"]),
    (_set(["tensors", "x", "zero_point"], 2.5), ["tensor 'x'", "'zero_point' must be an integer"]),
    (_set(["tensors", "x", "const"], "false"), ["tensor 'x'", "'const' must be true or false"]),
    (_set(["meta", "example_inputs", "x"], [[1, 2], [3]]), ["example input 'x'"]),
    (_set(["output_names"], []), ["1 outputs but 0 output names"]),
    (_set(["version"], 99), ["not an npu-sim program of format version 1"]),
])
def test_malformed_program_json_names_the_entry(tmp_path, change, words):
    folder = _saved(tmp_path)
    _edit(folder, change)
    message = _refused(folder, *words)
    assert str(folder) in message


@pytest.mark.parametrize("text, words", [
    ("{not json", ["not valid JSON"]),
    ("[" * 100000, ["nested more than"]),
    ('{"format": "graphopt-npu-program", "format": "x"}', ["'format' is given twice"]),
])
def test_unreadable_program_json(tmp_path, text, words):
    folder = _saved(tmp_path)
    (folder / "program.json").write_text(text)
    _refused(folder, "program.json", *words)


def test_weights_npz_corrupt_pickled_or_a_bomb(tmp_path):
    folder = _saved(tmp_path)
    (folder / "weights.npz").write_bytes(os.urandom(512))
    _refused(folder, "weights.npz", "not a readable .npz")
    np.savez(folder / "weights.npz", t=np.array([TABLE], dtype=object))
    _refused(folder, "weights.npz", "array 't'", "objects are not unpickled")
    with zipfile.ZipFile(folder / "weights.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("t.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.zeros(1 << 27, np.int8))
    _refused(folder, "weights.npz", "unpack to")


def test_kernel_failing_on_a_malformed_op_is_named(tmp_path):
    folder = _saved(tmp_path)
    _edit(folder, _set(["ops", 0, "attrs"], {}))  # lut without its offset
    _refused(folder, "op #0", "'halve_node'", "(lut) failed", "KeyError")


@pytest.mark.parametrize("feeds, words", [
    ({"x": np.array([[0.5, 1, 2, 3]])}, ["input 'x'", "cannot represent exactly"]),
    ({"x": np.array([[300, 1, 2, 3]])}, ["input 'x'", "cannot represent exactly"]),
    ({"x": np.zeros((1, 4), np.int8), "typo": np.zeros(1)}, ["no program input 'typo'"]),
    ({"x": np.array([["a", "b", "c", "d"]])}, ["input 'x' holds", "not numbers"]),
    ({"x": np.zeros((2, 4), np.int8)}, ["input 'x' has shape [2, 4]", "compiled for [1, 4]"]),
    ([1, 2], ["feeds must map input names"]),
])
def test_feeds_are_checked_never_wrapped_or_truncated(tmp_path, feeds, words):
    simulator = Simulator(Program.load(_saved(tmp_path)))
    with pytest.raises(BackendError) as info:
        simulator.run(feeds)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("options, words", [
    ({"batch": 10 ** 9}, ["option 'batch' must be in [1, 1024]"]),
    ({"seq_len": 10 ** 9}, ["option 'seq_len' must be in [0, 32768]"]),
    ({"batch": 0}, ["option 'batch'"]),
])
def test_batch_and_seq_len_are_bounded(options, words):
    with pytest.raises(OptionError) as info:
        NpuSim.from_options(options)
    for word in words:
        assert word in str(info.value)


def _packaged(folder, program: Program | None = None):
    """A program written as the backend writes it: one output set with its manifest."""
    with OutputSet(folder) as out:
        (program or small_program()).save(out.staging)
    return folder


def test_simulate_save_never_replaces_the_programs_weights(tmp_path, capsys):
    """np.savez appends .npz: `--save P/weights` once passed the check and replaced P/weights.npz."""
    folder = _packaged(tmp_path / "npu")
    before = (folder / "weights.npz").read_bytes()
    assert main(["simulate", str(folder), "--save", str(folder / "weights")]) == 2
    assert "refusing to write over the input" in capsys.readouterr().err
    assert (folder / "weights.npz").read_bytes() == before
    assert main(["simulate", str(folder), "--save", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["y"], [[-64, -1, 0, 63]])


def test_simulate_refuses_a_package_of_two_runs(tmp_path, capsys):
    """weights.npz of another run beside program.json (a half-updated package) is refused, not run."""
    folder = _packaged(tmp_path / "npu")
    other = small_program()
    other.constants = {"t": TABLE[::-1].copy()}
    _packaged(tmp_path / "other", other)
    (folder / "weights.npz").write_bytes((tmp_path / "other" / "weights.npz").read_bytes())
    assert main(["simulate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'weights.npz'}: does not match" in err and err.count("\n") == 1
