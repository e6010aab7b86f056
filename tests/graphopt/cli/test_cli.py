"""graphopt.cli: commands, one-line errors with exit code 2, convert's outputs, extension commands."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli
from graphopt.cli.command import COMMANDS, Command
from graphopt.ir import Model
from graphopt.pipeline.passes import PASSES, Pass, PassResult


@dataclass(frozen=True)
class _DropIdentity(Pass):
    """Test pass: bypass Identity nodes that do not produce a graph output."""

    name: ClassVar[str] = "test_cli_drop_identity"
    keep_outputs: bool = True

    def run_onnx(self, model: Model, ctx) -> PassResult:
        graph, changed = model.graph, False
        for node in [n for n in graph.nodes if n.op == "Identity" and n.outputs[0] not in graph.outputs]:
            src, dst = node.inputs[0], node.outputs[0]
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
            node.outputs.clear()
            changed = True
        graph.cleanup().toposort()
        return PassResult(model, changed)


@dataclass(frozen=True)
class _AppendRelu(Pass):
    """Test pass: y = Relu(y) at the first graph output."""

    name: ClassVar[str] = "test_cli_append_relu"

    def run_onnx(self, model: Model, ctx) -> PassResult:
        import onnx_graphsurgeon as gs

        out = model.graph.outputs[0]
        inner = gs.Variable(out.name + "_pre", dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = inner
        model.graph.nodes.append(gs.Node("Relu", name="appended_relu", inputs=[inner], outputs=[out]))
        return PassResult(model, True)


@pytest.fixture(autouse=True)
def test_pass(monkeypatch):
    monkeypatch.setitem(PASSES, _DropIdentity.name, _DropIdentity)
    monkeypatch.setitem(PASSES, _AppendRelu.name, _AppendRelu)


def _write_model(path, *, identities: int = 2):
    """x -> Identity* -> MatMul(W) -> y, saved as ONNX."""
    nodes, prev = [], "x"
    for i in range(identities):
        nodes.append(helper.make_node("Identity", [prev], [f"i{i}"], name=f"ident{i}"))
        prev = f"i{i}"
    nodes.append(helper.make_node("MatMul", [prev, "W"], ["y"], name="mm"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _recipe(path, text):
    path.write_text(text)
    return path


def _one_error_line(capsys, code):
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("graphopt"), captured.err
    assert "Traceback" not in captured.err
    return errors[0]


def test_passes_lists_forms_and_options(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "test_cli_drop_identity  [ONNX]  Test pass: bypass Identity nodes" in out
    assert "    keep_outputs: bool = True" in out
    assert cli.main(["passes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["test_cli_drop_identity"]["forms"] == ["onnx"]
    assert listed["test_cli_drop_identity"]["options"][0]["name"] == "keep_outputs"


def test_backends_runs(capsys):
    assert cli.main(["backends"]) == 0
    assert capsys.readouterr().out.strip()


def test_inspect_markdown_and_json(tmp_path, capsys):
    model = _write_model(tmp_path / "m.onnx")
    assert cli.main(["inspect", str(model)]) == 0
    captured = capsys.readouterr()
    assert "| Identity | 2 |" in captured.out and "- parameters: 16 (16)" in captured.out
    assert "loading" in captured.err  # progress goes to stderr
    assert cli.main(["inspect", str(model), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ops"] == {"Identity": 2, "MatMul": 1} and summary["params"] == 16


def test_inspect_form_choice(tmp_path, capsys):
    model = _write_model(tmp_path / "m.onnx")
    line = _one_error_line(capsys, cli.main(["inspect", str(model), "--form", "fx"]))
    assert "no ONNX -> FX path" in line
    assert cli.main(["inspect", "sample:tiny-llama", "--form", "fx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["form"] == "fx"


def test_missing_model_is_one_line_exit_2(tmp_path, capsys):
    line = _one_error_line(capsys, cli.main(["inspect", str(tmp_path / "nope.onnx")]))
    assert "nope.onnx" in line and "no such file" in line


@pytest.mark.parametrize("argv", [["frobnicate"], ["convert", "m.onnx"], [], ["inspect"]])
def test_bad_arguments_are_one_line_exit_2(argv, capsys):
    _one_error_line(capsys, cli.main(argv))


def test_bad_recipe_option_names_the_line(tmp_path, capsys):
    model = _write_model(tmp_path / "m.onnx")
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity:\n      keep_output: false\n")
    line = _one_error_line(capsys, cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "out")]))
    assert "r.yaml, line 3" in line and "unknown option 'keep_output'" in line
    assert not (tmp_path / "out").exists()


def test_convert_writes_model_and_report(tmp_path, capsys):
    model = _write_model(tmp_path / "m.onnx")
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity\n")
    out = tmp_path / "out"
    assert cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(out)]) == 0
    result = onnx.load(out / "model.onnx")
    assert [n.op_type for n in result.graph.node] == ["MatMul"]
    report = json.loads((out / "report.json").read_text())
    (step,) = report["steps"]
    assert step["name"] == "test_cli_drop_identity" and step["nodes"] == [3, 1]
    assert step["diff"]["ops_removed"] == {"Identity": 2} and step["diff"]["nodes_rewired"] == 1
    assert "−2 Identity" in (out / "report.md").read_text()

    # graphopt diff between input and output lists what the pass removed
    capsys.readouterr()
    assert cli.main(["diff", str(model), str(out / "model.onnx"), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["ops_removed"] == {"Identity": 2} and [n["name"] for n in diff["nodes_removed"]] == ["ident0", "ident1"]
    assert cli.main(["diff", str(model), str(out / "model.onnx")]) == 0
    assert "| Identity | -2 |" in capsys.readouterr().out


def test_convert_refuses_to_overwrite_the_input(tmp_path, capsys):
    model = _write_model(tmp_path / "model.onnx")
    before = model.read_bytes()
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity\n")
    line = _one_error_line(capsys, cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(tmp_path)]))
    assert "refusing to write over the input" in line
    assert model.read_bytes() == before


def test_convert_sample_with_calibration(tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity\ncalibration:\n  windows: 2\n  length: 16\n")
    assert cli.main(["convert", "sample:tiny-llama", "--recipe", str(recipe), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "calibration: 2 feeds" in err and "[test_cli_drop_identity]" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (step,) = report["steps"]  # the tiny Llama has no Identity: unchanged, so not re-run for fidelity
    assert report["model"] == "tiny-llama" and not step["changed"] and step["fidelity"] == {}
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_registered_command_joins_the_parser(monkeypatch, capsys):
    seen = {}

    def add(parser):
        parser.add_argument("--level", type=int, default=1)

    def run(args):
        seen["level"] = args.level
        return 0

    monkeypatch.setitem(COMMANDS, "test-echo", Command("test-echo", "echo", add, run))
    assert cli.main(["test-echo", "--level", "3"]) == 0 and seen == {"level": 3}
    _one_error_line(capsys, cli.main(["test-echo", "--level", "x"]))


@pytest.mark.real
def test_inspect_smollm2_onnx_reports_134_5m_parameters(capsys):
    assert cli.main(["inspect", "sample:smollm2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["params"] - 134.5e6) <= 0.1e6
    assert summary["ops"]["MatMul"] >= 30 * 7
    assert summary["outputs"][0]["name"] == "logits"


def test_convert_exports_with_the_recipe_backend(tmp_path, capsys, monkeypatch):
    from graphopt.pipeline.backends import BACKENDS, Artifact, Backend

    @dataclass(frozen=True)
    class _Echo(Backend):
        """Test backend: writes the node count."""

        name: ClassVar[str] = "test_cli_echo"
        suffix: str = ".txt"

        def emit(self, model, out_dir, *, force=False):
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"nodes{self.suffix}"
            path.write_text(str(model.num_nodes()))
            return Artifact(self.name, out_dir, [path])

        def validate(self, artifact, model):
            return {"ok": True}

    monkeypatch.setitem(BACKENDS, _Echo.name, _Echo)
    model = _write_model(tmp_path / "m.onnx")
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity\nbackend:\n  name: test_cli_echo\n  suffix: .log\n")
    out = tmp_path / "out"
    assert cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(out)]) == 0
    assert (out / "test_cli_echo" / "nodes.log").read_text() == "1"
    assert "test_cli_echo: " in capsys.readouterr().out

    bad = _recipe(tmp_path / "bad.yaml", "passes: []\nbackend:\n  name: test_cli_echo\n  sufix: .log\n")
    line = _one_error_line(capsys, cli.main(["convert", str(model), "--recipe", str(bad), "-o", str(out)]))
    assert "bad.yaml, line 4" in line and "unknown option 'sufix'" in line
    line = _one_error_line(capsys, cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(out), "--backend", "nope"]))
    assert "unknown backend 'nope'" in line


def test_diff_of_saved_models_names_the_pass_that_made_a_node(tmp_path, capsys):
    model = _write_model(tmp_path / "m.onnx")
    recipe = _recipe(tmp_path / "r.yaml", "passes:\n  - test_cli_drop_identity\n  - test_cli_append_relu\n")
    out = tmp_path / "out"
    assert cli.main(["convert", str(model), "--recipe", str(recipe), "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["diff", str(model), str(out / "model.onnx"), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["nodes_added"] == [{"name": "appended_relu", "op": "Relu", "made_by": "test_cli_append_relu"}]
    assert diff["ops_added"] == {"Relu": 1} and diff["ops_removed"] == {"Identity": 2}
