"""The writing boundary: output sets appear whole, never over an input or a stranger's file."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli
from graphopt.errors import GraphoptError, UnsafePathError
from graphopt.files.writing import MANIFEST, OutputSet, check_manifest, foreign_files
from graphopt.ir import Model


def _write(path, text):
    path.write_text(text)
    return path


def test_a_set_appears_whole_with_a_manifest(tmp_path):
    with OutputSet(tmp_path / "out") as out:
        _write(out.path("a.txt"), "a")
        _write(out.path("b.txt"), "b")
        assert not (tmp_path / "out" / "a.txt").exists()  # nothing is in place before the set is complete
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == [MANIFEST, "a.txt", "b.txt"]
    check_manifest(tmp_path / "out", ["a.txt", "b.txt"])


def test_a_failure_leaves_the_folder_as_it_was(tmp_path):
    with OutputSet(tmp_path) as out:
        _write(out.path("a.txt"), "old")
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path) as out:
            _write(out.path("a.txt"), "new")
            raise RuntimeError("interrupted")
    assert (tmp_path / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == [MANIFEST, "a.txt"]


def test_strangers_are_refused_unless_forced_and_inputs_always(tmp_path):
    _write(tmp_path / "notes.md", "mine")
    with pytest.raises(UnsafePathError, match="holds files graphopt did not write \\('notes.md'\\)"):
        with OutputSet(tmp_path):
            pass
    with OutputSet(tmp_path, force=True) as out:
        _write(out.path("report.md"), "report")
    assert (tmp_path / "notes.md").read_text() == "mine"
    with pytest.raises(UnsafePathError, match="refusing to write over the input"):
        with OutputSet(tmp_path, inputs=[tmp_path / "notes.md"], force=True) as out:
            out.path("notes.md")
    link = tmp_path / "hard.md"
    os.link(tmp_path / "notes.md", link)  # a hard link to an input is the input
    with pytest.raises(UnsafePathError, match="refusing to write over the input"):
        with OutputSet(tmp_path, inputs=[link], force=True) as out:
            out.path("notes.md")


def test_a_package_from_two_runs_is_detected(tmp_path):
    with OutputSet(tmp_path) as out:
        _write(out.path("program.json"), "{}")
        _write(out.path("weights.npz"), "w1")
    _write(tmp_path / "weights.npz", "w2 from an interrupted run")
    with pytest.raises(GraphoptError, match="does not match"):
        check_manifest(tmp_path, ["program.json", "weights.npz"])


def test_disk_errors_name_the_path(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GraphoptError, match=f"{tmp_path}.*no space left on the device"):
        with OutputSet(tmp_path) as out:
            _write(out.path("a.txt"), "a")
            monkeypatch.setattr(os, "replace", full)


def _small_model(path, external: bool):
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(proto, str(path))
    return path


def test_saving_beside_the_input_never_deletes_its_weights(tmp_path):
    """Model.save used to delete `model.onnx.data` as stale when the new model was small, even when
    the input's weights lived in it."""
    (tmp_path / "in").mkdir()
    src = _small_model(tmp_path / "in" / "model.onnx", external=True)
    data = (tmp_path / "in" / "model.onnx.data").read_bytes()
    model = Model.from_onnx(onnx.load(str(src)), source=src)
    with pytest.raises(UnsafePathError):
        model.save(src)
    model.save(tmp_path / "in" / "copy.onnx")
    assert (tmp_path / "in" / "model.onnx.data").read_bytes() == data


def test_convert_refuses_a_folder_of_strangers_and_keeps_them_with_force(tmp_path, capsys):
    src = _small_model(tmp_path / "model.onnx", external=False)
    recipe = _write(tmp_path / "r.yaml", "passes:\n  - cleanup\n")
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "report.md", "someone's report")
    assert cli.main(["convert", str(src), "--recipe", str(recipe), "-o", str(out)]) == 2
    assert "holds files graphopt did not write ('report.md')" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "someone's report" and sorted(os.listdir(out)) == ["report.md"]
    assert cli.main(["convert", str(src), "--recipe", str(recipe), "-o", str(out), "--force"]) == 0
    assert foreign_files(out) == []  # graphopt's report replaced the stranger's only because of --force
    assert cli.main(["convert", str(src), "--recipe", str(recipe), "-o", str(out)]) == 0  # its own files: fine


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_sensitivity_outputs_never_replace_the_model(tmp_path, capsys, flag):
    src = _small_model(tmp_path / "m.onnx", external=False)
    before = src.read_bytes()
    assert cli.main(["sensitivity", str(src), flag, str(src)]) == 2
    assert "refusing to write over the input" in capsys.readouterr().err and src.read_bytes() == before


def _constant_external_model(folder, data_name="model.onnx.data"):
    """in.onnx: y = x + c, c a Constant node whose value lives in `data_name` (no initializer names it)."""
    values = np.arange(64, dtype=np.float32)
    (folder / data_name).write_bytes(values.tobytes())
    tensor = numpy_helper.from_array(values, "c")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", "0"), ("length", str(values.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], name="const_c", value=tensor),
                               helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    path = folder / "in.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    return path


def test_convert_into_the_inputs_folder_keeps_a_constant_nodes_external_data(tmp_path, capsys):
    """The input list once looked at initializers only: `-o` the input's folder (with --force) could
    replace the `model.onnx.data` a Constant node of the input reads."""
    (tmp_path / "in").mkdir()
    src = _constant_external_model(tmp_path / "in")
    data = (tmp_path / "in" / "model.onnx.data").read_bytes()
    recipe = _write(tmp_path / "r.yaml", "passes:\n  - cleanup\n")
    assert cli.main(["convert", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "in"), "--force"]) == 2
    err = capsys.readouterr().err
    assert "refusing to write over the input" in err and "model.onnx.data" in err
    assert (tmp_path / "in" / "model.onnx.data").read_bytes() == data
    assert sorted(os.listdir(tmp_path / "in")) == ["in.onnx", "model.onnx.data"]


def test_convert_interrupted_while_writing_reports_leaves_no_model(tmp_path, monkeypatch, capsys):
    """The model and its reports are one output set: an interrupt after the model is written and before
    the reports are leaves neither (convert once wrote model.onnx first, then the reports)."""
    from graphopt.pipeline.report import Report

    src = _small_model(tmp_path / "m.onnx", external=False)
    recipe = _write(tmp_path / "r.yaml", "passes:\n  - cleanup\n")

    def interrupted(self, out_dir, stem="report"):
        (Path(out_dir) / f"{stem}.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(Report, "save", interrupted)
    assert cli.main(["convert", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "out")]) == 130
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_sigterm_during_a_save_leaves_no_staging_folder(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, time, sys
        sys.argv = ["graphopt"]
        from graphopt.cli import install_signal_handlers
        from graphopt.files.writing import OutputSet
        install_signal_handlers()
        try:
            with OutputSet({str(tmp_path / 'out')!r}) as out:
                out.path("a.txt").write_text("partial")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert done.returncode == 130
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EFBIG, "file too large for the file system")])
def test_a_full_disk_while_writing_names_the_folder(tmp_path, code, words):
    """The OS says "File too large" or "No space left on device" and names no file: the error names the folder."""
    with pytest.raises(GraphoptError, match=f"{tmp_path / 'out'}: cannot write: {words}"):
        with OutputSet(tmp_path / "out") as out:
            _write(out.path("a.txt"), "partial")
            raise OSError(code, os.strerror(code))
    assert os.listdir(tmp_path / "out") == []
