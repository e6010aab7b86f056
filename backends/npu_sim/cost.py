"""Cost model of an npu-sim program on a device profile: per-op cycles, MACs, bytes, SRAM, utilisation.

In the spirit of Arm Vela's per-layer report. Per NPU op:
- compute cycles: MACs / MAC array (matmul; 16-bit operands at 1/int16_mac_divisor rate; a weight
  with an N:M pattern the profile supports divides by its speed-up), elements / vector lanes for
  elementwise, LUT, requantize and softmax (3 passes), bytes / SRAM bandwidth for data movement
  (reshape is free: a view);
- memory cycles: weights stream from DRAM (dense bytes x weight_compression; a supported N:M weight
  stores its kept values plus index metadata), activations stay in SRAM unless the op's working
  set exceeds it (then they travel through DRAM too); quantize/dequantize cross the host link;
- cycles = max(compute, memory), the bound says which one won; utilisation = MACs / (cycles x array).
SRAM peak is the largest sum of live NPU activation bytes over the program order.
Host ops cost no NPU cycles; they are listed with unit "host".
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.backends.npu_sim.program import Program
from graphopt.errors import BackendError, OptionError
from graphopt.files.reading import read_yaml, want_dict, want_number

__all__ = ["Profile", "load_profile", "estimate", "CostReport", "PROFILE_DIR"]

PROFILE_DIR = Path(__file__).parent / "profiles"
REQUIRED = ("clock_hz", "mac_array", "vector_lanes", "sram_bytes", "sram_bytes_per_cycle", "dram_bytes_per_cycle")
ELEMENTWISE = {"add": 1, "sub": 1, "mul": 1, "lut": 1, "requantize": 1, "softmax": 3, "where": 1}
MOVES = {"transpose", "slice", "gather", "concat", "expand", "where"}
COLUMNS = ["index", "node", "kind", "unit", "macs", "cycles", "compute_cycles", "memory_cycles", "bound",
           "dram_read", "dram_write", "sram_read", "sram_write", "utilisation", "sparsity"]


@dataclass(frozen=True)
class Profile:
    name: str
    data: dict

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def load_profile(spec: str | Path = "default") -> Profile:
    """A profile by name (profiles/NAME.yaml) or path; missing keys are an OptionError naming them."""
    path = Path(spec)
    if not path.suffix:
        path = PROFILE_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise OptionError(f"npu-sim option 'profile': no profile '{spec}' (built in: {known}; or a YAML path)")
    data = read_yaml(path, max_bytes=1 << 20, error=OptionError, what="npu-sim profile") or {}
    data = want_dict(data, f"{path}", OptionError)
    for key in REQUIRED:
        if key not in data:
            raise OptionError(f"{path}: profile key '{key}' is missing")
        data[key] = want_number(data[key], f"{path}: profile key '{key}'", OptionError)
    return Profile(data.get("name", path.stem), data)


@dataclass
class CostReport:
    profile: str
    rows: list[dict]
    totals: dict

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(row)
        return buffer.getvalue()

    def summary_rows(self) -> list[dict]:
        """Per kernel kind: count, MACs, cycles and share of cycles (NPU ops only)."""
        groups: dict[str, dict] = {}
        for row in self.rows:
            key = f"{row['kind']} ({row['unit']})"
            g = groups.setdefault(key, {"kind": key, "ops": 0, "macs": 0, "cycles": 0, "dram": 0})
            g["ops"] += 1
            g["macs"] += row["macs"]
            g["cycles"] += row["cycles"]
            g["dram"] += row["dram_read"] + row["dram_write"]
        total = max(self.totals["cycles"], 1)
        for g in groups.values():
            g["share"] = g["cycles"] / total
        return sorted(groups.values(), key=lambda g: -g["cycles"])

    def to_markdown(self, top: int = 25) -> str:
        t = self.totals
        lines = [f"# npu-sim cost report ({self.profile})", "",
                 "| total | value |", "|---|---|",
                 f"| NPU ops / host ops | {t['npu_ops']} / {t['host_ops']} |",
                 f"| MACs | {t['macs']:,} |", f"| cycles | {t['cycles']:,} |",
                 f"| time at {t['clock_hz'] / 1e9:g} GHz | {t['time_ms']:.3f} ms |",
                 f"| DRAM read / write | {t['dram_read'] / 1e6:.2f} / {t['dram_write'] / 1e6:.2f} MB |",
                 f"| weights streamed | {t['weight_bytes'] / 1e6:.2f} MB |",
                 f"| SRAM peak | {t['sram_peak'] / 1e6:.3f} MB of {t['sram_bytes'] / 1e6:.2f} MB |",
                 f"| MAC utilisation | {t['utilisation']:.3f} |",
                 f"| compute-bound / memory-bound ops | {t['compute_bound']} / {t['memory_bound']} |", "",
                 "## By kernel", "", "| kernel | ops | MACs | cycles | share | DRAM MB |", "|---|---|---|---|---|---|"]
        for g in self.summary_rows():
            lines.append(f"| {g['kind']} | {g['ops']} | {g['macs']:,} | {g['cycles']:,} | {g['share']:.3f} | "
                         f"{g['dram'] / 1e6:.2f} |")
        lines += ["", f"## Top {top} ops by cycles", "",
                  "| # | node | kernel | MACs | cycles | bound | DRAM read | util | sparsity |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in sorted(self.rows, key=lambda r: -r["cycles"])[:top]:
            lines.append(f"| {row['index']} | {row['node']} | {row['kind']} | {row['macs']:,} | {row['cycles']:,} | "
                         f"{row['bound']} | {row['dram_read']:,} | {row['utilisation']:.3f} | {row['sparsity'] or ''} |")
        return "\n".join(lines) + "\n"


def _nbytes(program: Program, name: str) -> int:
    info = program.tensors.get(name)
    if info is None:
        return 0
    bits = 4 if info.dtype in ("int4", "uint4") else np.dtype(info.dtype).itemsize * 8
    return int(np.prod(info.shape, dtype=np.int64)) * bits // 8


def _elements(program: Program, name: str) -> int:
    return int(np.prod(program.tensors[name].shape, dtype=np.int64))


def _macs(program: Program, op) -> int:
    a, b = program.tensors[op.inputs[0]], program.tensors[op.inputs[1]]
    out = program.tensors[op.outputs[0]]
    depth = a.shape[-1] if a.shape else 1
    return int(np.prod(out.shape, dtype=np.int64)) * int(depth) * (1 if b.shape else 1)


def estimate(program: Program, profile: Profile) -> CostReport:
    """Cost of every op of `program` on `profile`, with totals."""
    p = profile.data
    sparsity = p.get("sparsity") or {}
    supported = set(sparsity.get("supported") or [])
    speedup = float(sparsity.get("speedup", 1.0))
    meta_bits = float(sparsity.get("metadata_bits", 0))
    compression = float(p.get("weight_compression", 1.0))
    host_bw = float(p.get("host_transfer_bytes_per_cycle", p["dram_bytes_per_cycle"]))
    rows, weight_bytes = [], 0
    for index, op in enumerate(program.ops):
        consts = [n for n in op.inputs if n and program.tensors.get(n) and program.tensors[n].const]
        acts_in = [n for n in op.inputs if n and n not in consts]
        act_bytes_in = sum(_nbytes(program, n) for n in acts_in)
        act_bytes_out = sum(_nbytes(program, n) for n in op.outputs)
        row = {"index": index, "node": op.node, "kind": op.kind, "unit": op.unit, "macs": 0, "cycles": 0,
               "compute_cycles": 0, "memory_cycles": 0, "bound": "", "dram_read": 0, "dram_write": 0,
               "sram_read": 0, "sram_write": 0, "utilisation": 0.0, "sparsity": ""}
        if op.unit == "host" and op.kind not in ("quantize", "dequantize"):
            row["bound"] = "host"
            rows.append(row)
            continue
        if op.kind in ("quantize", "dequantize"):
            moved = act_bytes_in + act_bytes_out
            row.update(memory_cycles=int(np.ceil(moved / host_bw)), bound="host-link",
                       sram_write=act_bytes_out if op.kind == "quantize" else 0,
                       sram_read=act_bytes_in if op.kind == "dequantize" else 0)
            row["cycles"] = row["memory_cycles"]
            rows.append(row)
            continue
        compute, w_bytes = 0.0, 0
        if op.kind in ("matmul", "matmul_acc"):
            macs = _macs(program, op)
            rate = p["mac_array"]
            a_info = program.tensors[op.inputs[0]]
            if max(np.dtype(a_info.dtype).itemsize, np.dtype(program.tensors[op.inputs[1]].dtype).itemsize) > 1:
                rate /= float(p.get("int16_mac_divisor", 4))
            pattern = op.attrs.get("sparsity")
            sparse = pattern in supported
            compute = macs / rate / (speedup if sparse else 1.0)
            for name in consts:
                raw = _nbytes(program, name)
                if sparse:
                    n, m = (int(x) for x in pattern.split(":"))
                    kept = raw * n / m
                    w_bytes += int(kept + kept * meta_bits / 8)
                else:
                    w_bytes += int(raw * compression)
            row["macs"], row["sparsity"] = macs, pattern or ""
        elif op.kind in ELEMENTWISE:
            compute = _elements(program, op.outputs[0]) * ELEMENTWISE[op.kind] / p["vector_lanes"]
            w_bytes = sum(_nbytes(program, n) for n in consts)
        elif op.kind in MOVES:
            compute = (act_bytes_in + act_bytes_out) / p["sram_bytes_per_cycle"]
        weight_bytes += w_bytes
        working = act_bytes_in + act_bytes_out
        spill = working > p["sram_bytes"]
        dram_read = w_bytes + (act_bytes_in if spill else 0)
        dram_write = act_bytes_out if spill else 0
        sram_traffic = 0 if op.kind == "reshape" else working
        memory = (dram_read + dram_write) / p["dram_bytes_per_cycle"] + sram_traffic / p["sram_bytes_per_cycle"]
        cycles = int(np.ceil(max(compute, memory)))
        row.update(compute_cycles=int(np.ceil(compute)), memory_cycles=int(np.ceil(memory)), cycles=cycles,
                   bound="compute" if compute >= memory else "memory", dram_read=int(dram_read),
                   dram_write=int(dram_write), sram_read=act_bytes_in, sram_write=act_bytes_out)
        if row["macs"] and cycles:
            row["utilisation"] = row["macs"] / (cycles * p["mac_array"])
        rows.append(row)
    totals = _totals(program, rows, p, weight_bytes)
    return CostReport(profile.name, rows, totals)


def _sram_peak(program: Program) -> int:
    """Largest sum of live NPU activation bytes (produced by an NPU op, alive until its last use)."""
    last_use: dict[str, int] = {}
    for i, op in enumerate(program.ops):
        for name in op.inputs:
            last_use[name] = i
    live: dict[str, int] = {}
    peak = 0
    for i, op in enumerate(program.ops):
        if op.unit == "npu" and op.kind != "reshape":
            for name in op.outputs:
                live[name] = _nbytes(program, name)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= i]:
            del live[name]
    return peak


def _totals(program: Program, rows: list[dict], p: dict, weight_bytes: int) -> dict:
    npu = [r for r in rows if r["unit"] == "npu" or r["bound"] == "host-link"]
    cycles = sum(r["cycles"] for r in rows)
    macs = sum(r["macs"] for r in rows)
    if not rows:
        raise BackendError("npu-sim: the program has no ops to cost")
    return {
        "npu_ops": program.count("npu"), "host_ops": program.count("host"), "macs": macs, "cycles": cycles,
        "clock_hz": float(p["clock_hz"]), "time_ms": cycles / float(p["clock_hz"]) * 1e3,
        "dram_read": sum(r["dram_read"] for r in rows), "dram_write": sum(r["dram_write"] for r in rows),
        "weight_bytes": weight_bytes, "sram_peak": _sram_peak(program), "sram_bytes": int(p["sram_bytes"]),
        "utilisation": macs / max(cycles * p["mac_array"], 1),
        "compute_bound": sum(1 for r in npu if r["bound"] == "compute"),
        "memory_bound": sum(1 for r in npu if r["bound"] == "memory"),
    }
