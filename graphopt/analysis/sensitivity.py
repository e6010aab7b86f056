"""Per-point quantization sensitivity: how much the output degrades when only one point is quantized.

A quantization point is a tensor a quantized model would carry in integers: every activation that
enters a compute op (inputs of linear layers, `linear_sites`, and both inputs of
MatMuls between two activations, i.e. attention scores and mixing) and every linear weight.

Speed. Re-creating an onnxruntime session per point would cost minutes on a 135M model, so the
probe model is built once: each activation point gets `Where(gate, DQ(Q(x)), x)` with its gate a
boolean graph input, and each weight becomes a graph input fed either its float or its
fake-quantized values. One session then measures every point by flipping one gate or swapping
one weight array per run. Ranges come from one calibration capture (min-max, per tensor).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import capture, progress_bar
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import GraphoptError, OptionError
from graphopt.evaluation.metrics import nll_sum
from graphopt.files.reading import read_json, shown, want_dict, want_list, want_number, want_str
from graphopt.ir import Model
from graphopt.quant import numerics
from graphopt.quant.observers import MinMaxObserver
from graphopt.quant.spec import QuantSpec

__all__ = [
    "QuantPoint", "quantization_points", "analyze_sensitivity", "SensitivityReport",
    "DEFAULT_ACTIVATION_SPEC", "DEFAULT_WEIGHT_SPEC", "METRICS", "read_sensitivity",
]

Metric = Literal["kl", "overlap", "ppl"]
METRICS = ("kl", "overlap", "ppl")
DEFAULT_ACTIVATION_SPEC = QuantSpec(dtype="uint8", granularity="tensor", symmetric=False)
DEFAULT_WEIGHT_SPEC = QuantSpec(dtype="int8", granularity="channel", axis=1, symmetric=True)


@dataclass(frozen=True)
class QuantPoint:
    """One tensor that quantization would touch.

    name: the ONNX tensor name (a weight keeps its parameter name through lowering).
    kind: "activation" or "weight".
    feeds: the linear weights this activation enters (empty for attention MatMul inputs and weights).
    axis: for weights, the output-channel axis (1 for MatMul's [in, out] weights).
    """

    name: str
    kind: Literal["activation", "weight"]
    feeds: tuple[str, ...] = ()
    axis: int = 1


def quantization_points(model: Model) -> list[QuantPoint]:
    """Activation points (graph order) then weight points; each tensor once (a tied table too)."""
    model.require("onnx", "quantization_points")
    sites = linear_sites(model)
    feeds: dict[str, list[str]] = {}
    for site in sites:
        feeds.setdefault(site.activation, []).append(site.weight)
    site_nodes = {site.node for site in sites}
    order: dict[str, None] = {}
    for node in model.graph.nodes:
        if node.name in site_nodes:
            order[node.inputs[0].name] = None
        elif node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs[:2]):
            order.update(dict.fromkeys(t.name for t in node.inputs[:2]))
    points = [QuantPoint(name, "activation", tuple(feeds.get(name, ()))) for name in order]
    weights: dict[str, int] = {}
    for site in sites:
        weights.setdefault(site.weight, site.out_axis)
    points += [QuantPoint(name, "weight", axis=axis) for name, axis in weights.items()]
    return points


@dataclass
class SensitivityReport:
    """The ranking, most sensitive first, in the JSON form the quantize pass reads."""

    model: str
    metric: str
    ranking: list[dict[str, Any]]
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "metric": self.metric, "protocol": self.protocol, "ranking": self.ranking}

    def save_json(self, path: str | Path) -> Path:
        from graphopt.files.writing import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2))
        return Path(path)

    def markdown(self, top: int = 30) -> str:
        lines = ["| rank | point | kind | drop | KL | overlap@1 | ppl ratio | SQNR dB |",
                 "|---|---|---|---|---|---|---|---|"]
        for rank, row in enumerate(self.ranking[:top], 1):
            lines.append(
                f"| {rank} | `{row['point']}`{_feeds_note(row)} | {row['kind']} | {row['drop']:.4g} | "
                f"{row['kl']:.4g} | {row['overlap@1']:.4f} | {row['ppl_ratio']:.4f} | {row['sqnr_db']:.1f} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, top: int = 40) -> Path:
        """A bar chart of the `top` drops, activations and weights in two colours (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.ranking[:top]
        fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(rows)), 5), dpi=110)
        colours = ["tab:red" if r["kind"] == "activation" else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), [max(r["drop"], 1e-9) for r in rows], color=colours)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([_short(r) for r in rows], rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"drop ({self.metric})")
        ax.set_title(f"{self.model}: {top} most sensitive quantization points (red: activation, blue: weight)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


MAX_SENSITIVITY_BYTES = 64 << 20  # a ranking of every point of a large model is a few MB


def read_sensitivity(path: str, who: str) -> list[dict]:
    """The ranking of a `graphopt sensitivity` JSON file, most sensitive first:
    [{"point", "kind", "drop", "feeds"}, ...]. Read through the reading boundary (size, depth, strict
    types); any problem is an OptionError that names the file, the entry and `who` (a pass)."""
    prefix = f"'{who}': option 'sensitivity': "

    def error(message: str) -> OptionError:
        return OptionError(prefix + message)

    data = read_json(path, max_bytes=MAX_SENSITIVITY_BYTES, error=error, what="sensitivity file")
    ranking = data.get("ranking") if isinstance(data, dict) else None
    if not isinstance(ranking, list):
        raise error(f"{path}: not a sensitivity JSON: it needs a 'ranking' list of {{point, kind, drop, feeds}} entries")
    rows = []
    for index, row in enumerate(ranking):
        where = f"{path}: ranking entry {index}"
        row = want_dict(row, where, error)
        point = want_str(row.get("point"), f"{where} 'point'", error)
        kind = row.get("kind", "activation")
        if kind not in ("activation", "weight"):
            raise error(f"{where} ({shown(point)}): 'kind' must be 'activation' or 'weight', got {shown(kind)}")
        drop = want_number(row.get("drop", 0.0), f"{where} ({shown(point)}) 'drop'", error)
        feeds = want_list(row.get("feeds", []), f"{where} ({shown(point)}) 'feeds'", error)
        rows.append({"point": point, "kind": kind, "drop": drop,
                     "feeds": [want_str(f, f"{where} ({shown(point)}) 'feeds'", error) for f in feeds]})
    return rows


def _feeds_note(row: dict) -> str:
    return f" → {row['feeds'][0]}" if row.get("feeds") else ""


def _short(row: dict) -> str:
    label = row["feeds"][0] if row.get("feeds") else row["point"]
    label = label.replace("model.layers.", "L").replace(".weight", "")
    return f"{'in:' if row['kind'] == 'activation' else ''}{label}"


# -------------------------------------------------------------------------------- the probe
@dataclass
class _Probe:
    """The model with every point switchable at run time, and the feeds that switch them."""

    session: Any
    gates: dict[str, str]  # activation point -> gate input name
    weights: dict[str, np.ndarray]  # weight point -> float values (fed as graph inputs)
    input_names: list[str]

    def run(self, feeds: dict, active: str | None = None, weight_override: np.ndarray | None = None) -> np.ndarray:
        full = dict(feeds)
        for point, gate in self.gates.items():
            full[gate] = np.array(point == active)
        for name, values in self.weights.items():
            full[name] = weight_override if name == active and weight_override is not None else values
        return self.session.run(None, {n: full[n] for n in self.input_names})[0]


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def _build_probe(model: Model, points: list[QuantPoint], ranges: dict[str, tuple[float, float]], spec: QuantSpec) -> _Probe:
    graph = model.graph.copy()
    tensors = graph.tensors()
    gates: dict[str, str] = {}
    for index, point in enumerate(p for p in points if p.kind == "activation"):
        x = tensors[point.name]
        consumers = list(x.outputs)
        lo, hi = ranges[point.name]
        scale, zero_point = numerics.scale_zero_point(np.float32(lo), np.float32(hi), spec)
        scale_c = gs.Constant(f"{point.name}__sens_scale", np.asarray(scale, dtype=np.float32).reshape(()))
        zp_c = gs.Constant(f"{point.name}__sens_zp", np.asarray(zero_point).astype(spec.np_dtype).reshape(()))
        gate = gs.Variable(f"__sens_gate_{index}", dtype=np.bool_, shape=[])
        q = gs.Variable(f"{point.name}__sens_q", dtype=spec.np_dtype)
        dq = gs.Variable(f"{point.name}__sens_dq", dtype=np.float32)
        out = gs.Variable(f"{point.name}__sens", dtype=np.float32)
        graph.nodes += [
            gs.Node("QuantizeLinear", f"{point.name}__sens_Q", inputs=[x, scale_c, zp_c], outputs=[q]),
            gs.Node("DequantizeLinear", f"{point.name}__sens_DQ", inputs=[q, scale_c, zp_c], outputs=[dq]),
            gs.Node("Where", f"{point.name}__sens_switch", inputs=[gate, dq, x], outputs=[out]),
        ]
        for node in consumers:
            _rewire(node, x, out)
        graph.inputs.append(gate)
        gates[point.name] = gate.name
    weights: dict[str, np.ndarray] = {}
    for point in (p for p in points if p.kind == "weight"):
        const = tensors[point.name]
        values = np.ascontiguousarray(const.values, dtype=np.float32)
        var = gs.Variable(point.name, dtype=np.float32, shape=list(values.shape))
        for node in list(const.outputs):
            _rewire(node, const, var)
        graph.inputs.append(var)
        weights[point.name] = values
    graph.cleanup().toposort()
    probe = model.replace(graph=graph)
    session = probe.session()
    return _Probe(session, gates, weights, [i.name for i in session.get_inputs()])


# ------------------------------------------------------------------------------- the metrics
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _compare(reference: list[np.ndarray], ref_logp: list[np.ndarray], test: list[np.ndarray],
             ids: list[np.ndarray], ref_nll: float) -> dict[str, float]:
    kl, hits, nll, count, signal, noise = 0.0, 0.0, 0.0, 0, 0.0, 0.0
    positions = 0
    for ref, logp, out, window in zip(reference, ref_logp, test, ids):
        test_logp = _log_softmax(out)
        kl += float(np.sum(np.exp(logp) * (logp - test_logp)))
        hits += float(np.sum(ref.argmax(-1) == out.argmax(-1)))
        positions += ref.size // ref.shape[-1]
        if window is not None:
            loss, n = nll_sum(out, window)
            nll, count = nll + loss, count + n
        signal += float(np.sum(ref.astype(np.float64) ** 2))
        noise += float(np.sum((ref.astype(np.float64) - out) ** 2))
    return {
        "kl": kl / positions,
        "overlap@1": hits / positions,
        "ppl_ratio": float(np.exp((nll - ref_nll) / count)) if count else float("nan"),
        "sqnr_db": float("inf") if noise == 0 else 10.0 * np.log10(signal / noise),
    }


def _drop(row: dict[str, float], metric: Metric) -> float:
    if metric == "kl":
        return row["kl"]
    if metric == "overlap":
        return 1.0 - row["overlap@1"]
    return row["ppl_ratio"] - 1.0


def analyze_sensitivity(
    model: Model,
    calib: list[dict[str, np.ndarray]],
    measure: list[dict[str, np.ndarray]] | None = None,
    *,
    activation_spec: QuantSpec = DEFAULT_ACTIVATION_SPEC,
    weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
    metric: Metric = "kl",
    kinds: tuple[str, ...] = ("activation", "weight"),
    points: list[str] | None = None,
    progress: bool = True,
) -> SensitivityReport:
    """Quantize one point at a time and rank points by the fidelity drop of the first output.

    `calib` feeds give the activation ranges (min-max); `measure` feeds (default: `calib`) are
    run once in float and once per point. The drop is `metric`: "kl" (mean KL(float ‖ quantized)
    per position), "overlap" (1 − top-1 agreement) or "ppl" (perplexity ratio − 1, causal LMs);
    every row also carries all three, and the SQNR of the output in dB. `kinds` and `points`
    (tensor names) restrict the sweep. The model is not modified.
    """
    model.require("onnx", "analyze_sensitivity")
    if metric not in METRICS:
        raise OptionError(f"sensitivity: metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if not calib:
        raise OptionError("sensitivity needs calibration feeds (at least one batch)")
    if weight_spec.granularity not in ("tensor", "channel", "block"):
        raise OptionError(f"sensitivity: weight granularity '{weight_spec.granularity}' is not static")
    measure = measure or calib
    everything = quantization_points(model)
    unknown = sorted(set(points or ()) - {p.name for p in everything})
    if unknown:
        raise OptionError(f"sensitivity: '{unknown[0]}' is not a quantization point of '{model.name}'")
    points = [p for p in everything if p.kind in kinds and (points is None or p.name in points)]
    if not points:
        raise GraphoptError(f"sensitivity: '{model.name}' has no quantization point (no MatMul/Gemm/Conv with a constant weight)")
    act_names = [p.name for p in points if p.kind == "activation"]
    stats = capture(model, calib, act_names, lambda _: MinMaxObserver(), progress=progress, desc="sensitivity: ranges")
    ranges = {name: observer.range() for name, observer in stats.items()}
    probe = _build_probe(model, points, ranges, activation_spec)
    lm = model.task == "causal-lm"
    ids = [feeds[model.inputs[0].name] if lm else None for feeds in measure]
    reference = [probe.run(feeds) for feeds in measure]
    ref_logp = [_log_softmax(r) for r in reference]
    ref_nll = sum(nll_sum(r, w)[0] for r, w in zip(reference, ids)) if lm else 0.0
    ranking = []
    for point in progress_bar(points, len(points), "sensitivity: points", progress):
        override = None
        if point.kind == "weight":
            spec = weight_spec if weight_spec.granularity == "tensor" else _with_axis(weight_spec, point.axis)
            override = numerics.fake_quant(probe.weights[point.name], spec).astype(np.float32)
        outputs = [probe.run(feeds, point.name, override) for feeds in measure]
        row = _compare(reference, ref_logp, outputs, ids, ref_nll)
        ranking.append({"point": point.name, "kind": point.kind, "drop": _drop(row, metric),
                        "feeds": list(point.feeds), **row})
    ranking.sort(key=lambda r: (-r["drop"], r["sqnr_db"]))
    protocol = {
        "calibration_batches": len(calib), "measure_batches": len(measure),
        "activation_spec": dataclasses.asdict(activation_spec),
        "weight_spec": dataclasses.asdict(weight_spec),
        "points": {"activation": len(act_names), "weight": len(points) - len(act_names)},
    }
    return SensitivityReport(model.name, metric, ranking, protocol)


def _with_axis(spec: QuantSpec, axis: int) -> QuantSpec:
    if spec.granularity == "block":
        return dataclasses.replace(spec, axis=1 - axis)  # blocks run along the input dim
    return dataclasses.replace(spec, axis=axis)
