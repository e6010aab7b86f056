"""`graphopt simulate PROGRAM`: run an npu-sim program folder in the simulator and print its cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from graphopt.cli.command import log, register_command

MAX_INPUTS_BYTES = 4 << 30  # an --inputs .npz of feeds


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", help="an npu-sim output folder (program.json + weights.npz)")
    parser.add_argument("--inputs", metavar="FEEDS.npz", help="input arrays by name (default: the compile-time example)")
    parser.add_argument("--profile", default="default", help="device profile name or YAML path for the cost totals")
    parser.add_argument("--save", metavar="OUT.npz", help="write the outputs here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _run(args) -> int:
    from graphopt.cli.command import write_output_file
    from graphopt.errors import BackendError
    from graphopt.files.reading import read_npz
    from graphopt.files.writing import refuse_overwrite
    from graphopt.pipeline import available_backends

    program_dir = Path(args.program)
    inputs = [p for p in program_dir.iterdir() if p.is_file()] if program_dir.is_dir() else [program_dir]
    inputs += [Path(args.inputs)] if args.inputs else []
    save = None
    if args.save:  # np.savez would append .npz: decide the real name before checking it
        save = Path(args.save) if args.save.endswith(".npz") else Path(args.save + ".npz")
        refuse_overwrite(save, inputs)
    simulator = available_backends()["npu-sim"].from_options({"profile": args.profile})
    feeds = None
    if args.inputs:
        feeds = read_npz(args.inputs, max_bytes=MAX_INPUTS_BYTES, error=BackendError, what="inputs file")
    result = simulator.simulate(args.program, feeds)
    program, outputs, cost = result.pop("program"), result.pop("outputs"), result["cost"]
    log(f"simulate: {program.name}, {result['npu_ops']} NPU ops, {result['host_ops']} host ops")
    if save:
        def write(path: Path) -> None:
            with open(path, "wb") as fh:
                np.savez(fh, **outputs)

        log(f"simulate: outputs written to {write_output_file(save, write, inputs)}")
    result = {"program": str(args.program), **result, "outputs": {n: list(o.shape) for n, o in outputs.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{program.name}: simulated in {result['simulate_s']:.2f} s ({result['npu_ops']} NPU ops, "
          f"{result['host_ops']} host ops)")
    for name, shape in result["outputs"].items():
        print(f"  output {name}: {shape}")
    print(f"  cost on {result['profile']}: {cost['cycles']:,} cycles = {cost['time_ms']:.3f} ms, {cost['macs']:,} MACs, "
          f"utilisation {cost['utilisation']:.3f}, SRAM peak {cost['sram_peak'] / 1e6:.3f} MB")
    return 0


register_command("simulate", _args, _run, "run an npu-sim program in the simulator; print outputs and cost")
