"""The per-step report of a pipeline run: what the instruments measured, as Markdown and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.files.json_files import jsonable, write_json

__all__ = ["StepRecord", "Report"]


@dataclass
class StepRecord:
    """What the pass manager measured around one step (a pass or the lowering).

    Every measurement is an instrument's; one that did not run leaves its field empty, and
    `notes` says why a check was skipped (e.g. fidelity on a model without sample inputs).
    """

    name: str
    form: str
    changed: bool
    seconds: float | None = None
    nodes: tuple[int, int] | None = None
    params: tuple[int, int] | None = None
    bytes: tuple[int, int] | None = None
    diff: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Per-step records of one pipeline run; readable as Markdown, machine-readable as JSON."""

    model: str
    steps: list[StepRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "steps": [jsonable(vars(s)) for s in self.steps]}

    def to_markdown(self) -> str:
        fid_keys = sorted({k for s in self.steps for k in s.fidelity}, key=_fidelity_order)
        head = ["step", "form", "time s", "changed", "nodes", "params", "bytes", "diff"] + fid_keys
        lines = [f"# graphopt report: {self.model}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for s in self.steps:
            row = [s.name, s.form, _fmt_seconds(s.seconds), "yes" if s.changed else "no",
                   _arrow(s.nodes), _arrow(s.params), _arrow(s.bytes), _diff_text(s.diff)]
            row += [fmt(s.fidelity.get(k)) for k in fid_keys]
            lines.append("| " + " | ".join(row) + " |")
        stats = [(s.name, s.stats) for s in self.steps if s.stats]
        if stats:
            lines += ["", "## Pass statistics", ""]
            for name, st in stats:
                lines.append(f"- **{name}**: " + ", ".join(
                    f"{k}={_stat_text(v)}" for k, v in st.items() if not isinstance(v, list)))
        notes = [(s.name, note) for s in self.steps for note in s.notes]
        if notes:
            lines += ["", "## Notes", ""] + [f"- **{name}**: {note}" for name, note in notes]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        from graphopt.files.writing import atomic_write_text

        out_dir = Path(out_dir)
        js = write_json(out_dir / f"{stem}.json", self.to_json(), indent=2)
        md = atomic_write_text(out_dir / f"{stem}.md", self.to_markdown())
        return js, md


def fidelity_text(fid: dict) -> str:
    """'sqnr_db 35.1000, cosine 0.9990, ...' in the report's order."""
    return ", ".join(f"{k} {fmt(v)}" for k, v in sorted(fid.items(), key=lambda kv: _fidelity_order(kv[0])))


def _fidelity_order(key: str) -> tuple:
    order = ["sqnr_db", "cosine", "overlap@1"]
    return (order.index(key) if key in order else len(order), key)


def _fmt_seconds(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.2f}"


def _arrow(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return ""
    a, b = pair
    return f"{a:,}" if a == b else f"{a:,} → {b:,}"


def _diff_text(diff: dict) -> str:
    if not diff:
        return ""
    parts = []
    for key in ("ops_added", "ops_removed"):
        ops = diff.get(key) or {}
        sign = "+" if key == "ops_added" else "−"
        parts += [f"{sign}{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:4]]
    return ", ".join(parts)


def fmt(value: Any) -> str:
    """A number as the report prints it (4 decimals below 1000, inf spelt out)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _stat_text(value: Any) -> str:
    """A statistic for the report's text: a dict of [part, whole] pairs as "key part/whole ..."
    (e.g. int16_share), anything else as `fmt` writes it (lists are left to the JSON)."""
    if isinstance(value, dict):
        return " ".join(f"{k} {v[0]}/{v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else f"{k} {fmt(v)}"
                        for k, v in value.items())
    return fmt(value)
