"""The protocol and the suites, read from bench/protocol.yaml and bench/suites.yaml and checked.

A suite is a list of tables; a table is one model, one measure and its rows; a row says how its
model is built (the float model, a recipe, passes, a peer tool, a QAT run), how it runs and what
it is compared with. Nothing here measures: bench.runner does, bench.report renders.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graphopt.errors import GraphoptError

__all__ = ["BENCH", "ROOT", "SuiteError", "Protocol", "Row", "Table", "Target", "Suite", "load_protocol",
           "load_suites", "parse_suites", "MEASURES", "BUILD_KINDS", "RUNTIMES"]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MEASURES = ("lm", "embedding", "image", "backend", "npu-cost", "memory", "decode")
BUILD_KINDS = ("fp32", "recipe", "passes", "peer", "qat", "convert", "decoder", "genai")
DECODE_BUILDS = ("decoder", "recipe", "genai")  # how a decode table's row makes its decoder folder
RUNTIMES = ("ort", "ort-basic", "npu-sim", "torch")


class SuiteError(GraphoptError):
    """A protocol or suite declaration is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Protocol:
    """How every suite measures, declared once (bench/protocol.yaml); `data` is the whole mapping."""

    data: dict

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def corpora(self) -> list[str]:
        """Evaluation corpora, the first one primary (its columns carry no suffix)."""
        return list(self.data["evaluation"]["corpora"])

    def model_source(self, key: str) -> str:
        return self.data["models"][key]

    def replace(self, **changes: dict) -> "Protocol":
        """A copy with sections updated key by key (`replace(evaluation={"windows": 2})`)."""
        data = copy.deepcopy(self.data)
        for section, values in changes.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        return Protocol(data)


@dataclass(frozen=True)
class Row:
    """One row: `build` steps ([{kind: spec}, ...]) applied in order, the runtime, the comparison."""

    name: str
    build: tuple[tuple[str, Any], ...]
    runtime: str = "ort"
    against: tuple[str, ...] = ()
    reference: bool = False
    backend: str | None = None
    requires: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Rows with the same key build the same model (built once per table)."""
        return json.dumps(self.build, sort_keys=True, default=str)

    @property
    def recipe(self) -> str | None:
        """The recipe file a row measures, when its last build step is one."""
        kind, spec = self.build[-1]
        return spec if kind == "recipe" else None


@dataclass(frozen=True)
class Target:
    """A figure a table is held to: `row`'s `column` `op` (">=" / "<=") a number, or `factor` times
    the same column of the row named by `value`."""

    row: str
    column: str
    op: str
    value: float | str
    factor: float = 1.0
    note: str = ""

    def bound(self, rows: dict[str, dict]) -> float | None:
        if isinstance(self.value, str):
            other = rows.get(self.value, {}).get(self.column)
            return None if other is None else self.factor * other
        return float(self.value)

    def describe(self) -> str:
        bound = f"{self.factor:g} x {self.value}'s" if isinstance(self.value, str) else f"{self.value:g}"
        if isinstance(self.value, str) and self.factor == 1.0:
            bound = f"{self.value}'s"
        return f"{self.row}: {self.column} {self.op} {bound}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    model: str
    measure: str
    rows: tuple[Row, ...]
    columns: tuple[str, ...]
    about: str
    ratios: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)  # column -> "pass.stat" read from the pipeline report
    quotients: dict = field(default_factory=dict)  # column -> (numerator column, denominator column), per row
    targets: tuple[Target, ...] = ()
    options: dict = field(default_factory=dict)
    calibration: str | None = None  # a set of the protocol's calibration.sets, instead of its default calibration

    @property
    def reference(self) -> Row | None:
        return next((r for r in self.rows if r.reference), None)


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    about: str
    tables: tuple[Table, ...]
    needs: str = "cpu"  # the device its rows need: "cpu" or "cuda"


# ------------------------------------------------------------------------------------ loading
def load_protocol(path: str | Path = BENCH / "protocol.yaml") -> Protocol:
    data = _read_yaml(Path(path))
    missing = [k for k in ("models", "corpora", "evaluation", "calibration", "embedding", "latency", "threads")
               if k not in data]
    if missing:
        raise SuiteError(f"{path}: the protocol needs a '{missing[0]}' section")
    unknown = [c for c in data["evaluation"].get("corpora", []) if c not in data["corpora"]]
    if unknown or not data["evaluation"].get("corpora"):
        raise SuiteError(f"{path}: evaluation.corpora names no declared corpus ({unknown or 'empty'})")
    return Protocol(data)


def load_suites(path: str | Path = BENCH / "suites.yaml", protocol: Protocol | None = None) -> dict[str, Suite]:
    return parse_suites(_read_yaml(Path(path)), str(path), protocol or load_protocol())


def parse_suites(data: dict, where: str, protocol: Protocol) -> dict[str, Suite]:
    """Suites from their mapping (the parsed suites file); every problem names `where` and the entry."""
    if not isinstance(data, dict) or not data:
        raise SuiteError(f"{where}: expected a mapping of suite name -> suite")
    return {name: _suite(name, body, f"{where}: suite '{name}'", protocol) for name, body in data.items()}


def _suite(name: str, body: Any, where: str, protocol: Protocol) -> Suite:
    body = _mapping(body, where, required=("title", "about", "tables"), allowed=("needs",))
    tables = [_table(t, f"{where}, table #{i + 1}", protocol) for i, t in enumerate(_list(body["tables"], where))]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise SuiteError(f"{where}: two tables are named alike ({names})")
    if body.get("needs", "cpu") not in ("cpu", "cuda"):
        raise SuiteError(f"{where}: 'needs' must be cpu or cuda, got {body['needs']!r}")
    return Suite(name, body["title"], _text(body["about"]), tuple(tables), body.get("needs", "cpu"))


def _table(body: Any, where: str, protocol: Protocol) -> Table:
    body = _mapping(body, where, required=("name", "title", "model", "measure", "rows", "columns", "about"),
                    allowed=("ratios", "stats", "quotients", "targets", "options", "calibration"))
    where = f"{where} ('{body['name']}')"
    sets = protocol["calibration"].get("sets", {})
    if "calibration" in body and body["calibration"] not in sets:
        raise SuiteError(f"{where}: calibration set '{body['calibration']}' is not in the protocol's calibration.sets "
                         f"({', '.join(sets) or 'none'})")
    if body["model"] not in protocol["models"]:
        raise SuiteError(f"{where}: model '{body['model']}' is not in the protocol's models "
                         f"({', '.join(protocol['models'])})")
    if body["measure"] not in MEASURES:
        raise SuiteError(f"{where}: measure '{body['measure']}' is not one of {', '.join(MEASURES)}")
    rows = tuple(_row(r, f"{where}, row #{i + 1}") for i, r in enumerate(_list(body["rows"], where)))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise SuiteError(f"{where}: two rows are named alike")
    reference = next((r.name for r in rows if r.reference), None)
    for index, row in enumerate(rows):
        for other in row.against:
            if other not in names[:index] and other != reference:
                raise SuiteError(f"{where}: row '{row.name}' is compared with '{other}', which is no earlier row "
                                 "of the table")
    if body["measure"] in ("lm", "embedding") and sum(r.reference for r in rows) != 1:
        raise SuiteError(f"{where}: an {body['measure']} table needs exactly one row with 'reference: true'")
    if body["measure"] == "decode":
        for row in rows:
            kinds = [kind for kind, _ in row.build if kind != "fp32"]
            if len(kinds) != 1 or kinds[0] not in DECODE_BUILDS:
                raise SuiteError(f"{where}: row '{row.name}' of a decode table is built by one of "
                                 f"{', '.join(DECODE_BUILDS)}, got {kinds or ['fp32']}")
    targets = tuple(_target(t, f"{where}, target #{i + 1}", names) for i, t in enumerate(body.get("targets", [])))
    return Table(body["name"], body["title"], body["model"], body["measure"], rows, tuple(body["columns"]),
                 _text(body["about"]), tuple(body.get("ratios", ())), dict(body.get("stats", {})),
                 _quotients(body.get("quotients", {}), where), targets, dict(body.get("options", {})),
                 body.get("calibration"))


def _quotients(body: Any, where: str) -> dict[str, tuple[str, str]]:
    """`{column: [numerator, denominator]}`: a column each row computes from two of its own."""
    if not isinstance(body, dict) or not all(isinstance(v, list) and len(v) == 2 for v in body.values()):
        raise SuiteError(f"{where}: 'quotients' maps a column to [numerator column, denominator column]")
    return {column: tuple(pair) for column, pair in body.items()}


def _row(body: Any, where: str) -> Row:
    body = _mapping(body, where, required=("name", "build"),
                    allowed=("runtime", "against", "reference", "backend", "requires", "options"))
    where = f"{where} ('{body['name']}')"
    steps = body["build"] if isinstance(body["build"], list) else [body["build"]]
    build = []
    for step in steps:
        if step == "fp32":
            step = {"fp32": None}
        if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in BUILD_KINDS:
            raise SuiteError(f"{where}: each build step is one of {', '.join(BUILD_KINDS)} with its spec, "
                             f"got {step!r}")
        build.append(next(iter(step.items())))
    if build[0][0] in ("recipe", "passes", "peer"):
        build.insert(0, ("fp32", None))  # recipes, passes and peers start from the float model
    runtime = body.get("runtime", "ort")
    if runtime not in RUNTIMES:
        raise SuiteError(f"{where}: runtime '{runtime}' is not one of {', '.join(RUNTIMES)}")
    against = body.get("against", [])
    return Row(str(body["name"]), tuple(build), runtime, tuple(against if isinstance(against, list) else [against]),
               bool(body.get("reference", False)), body.get("backend"), body.get("requires"),
               dict(body.get("options", {})))


def _target(body: Any, where: str, rows: list[str]) -> Target:
    body = _mapping(body, where, required=("row", "column"), allowed=("min", "max", "factor", "note"))
    if ("min" in body) == ("max" in body):
        raise SuiteError(f"{where}: a target has exactly one of 'min' or 'max'")
    op, value = (">=", body["min"]) if "min" in body else ("<=", body["max"])
    for name in [body["row"]] + ([value] if isinstance(value, str) else []):
        if name not in rows:
            raise SuiteError(f"{where}: '{name}' is no row of the table")
    return Target(body["row"], body["column"], op, value, float(body.get("factor", 1.0)), body.get("note", ""))


def _mapping(body: Any, where: str, required: tuple[str, ...], allowed: tuple[str, ...] = ()) -> dict:
    if not isinstance(body, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(body).__name__}")
    missing = [k for k in required if k not in body]
    if missing:
        raise SuiteError(f"{where}: '{missing[0]}' is missing")
    unknown = [k for k in body if k not in required + allowed]
    if unknown:
        raise SuiteError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(required + allowed)})")
    return body


def _list(body: Any, where: str) -> list:
    if not isinstance(body, list) or not body:
        raise SuiteError(f"{where}: expected a non-empty list")
    return body


def _text(value: str) -> str:
    """Folded YAML text as one paragraph."""
    return " ".join(str(value).split())


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
