"""`graphopt simulate PROGRAM`: run an npu-sim program folder in the simulator and print its cost."""

from __future__ import annotations

import argparse
import json

from graphopt.cli import log, register_command
from graphopt.errors import GraphoptError


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", help="an npu-sim output folder (program.json + weights.npz)")
    parser.add_argument("--inputs", metavar="FEEDS.npz", help="input arrays by name (default: the compile-time example)")
    parser.add_argument("--profile", default="default", help="device profile name or YAML path for the cost totals")
    parser.add_argument("--save", metavar="OUT.npz", help="write the outputs here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _run(args) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from graphopt.backends.npu_sim.cost import estimate, load_profile
    from graphopt.backends.npu_sim.program import Program
    from graphopt.backends.npu_sim.simulator import Simulator

    program = Program.load(args.program)
    profile = load_profile(args.profile)
    if args.inputs:
        if not Path(args.inputs).is_file():
            raise GraphoptError(f"{args.inputs}: no such inputs file")
        with np.load(args.inputs) as data:
            feeds = {k: data[k] for k in data.files}
    else:
        feeds = {k: np.array(v) for k, v in program.meta.get("example_inputs", {}).items()}
    log(f"simulate: {program.name}, {program.count('npu')} NPU ops, {program.count('host')} host ops")
    start = time.perf_counter()
    outputs = Simulator(program).run(feeds)
    seconds = time.perf_counter() - start
    cost = estimate(program, profile).totals
    if args.save:
        from graphopt.onnx_io import refuse_overwrite

        refuse_overwrite(Path(args.save), [Path(args.program) / "weights.npz"])
        np.savez(args.save, **dict(zip(program.output_names, outputs)))
    result = {"program": str(args.program), "simulate_s": seconds, "npu_ops": program.count("npu"),
              "host_ops": program.count("host"), "outputs": {n: list(o.shape) for n, o in zip(program.output_names, outputs)},
              "cost": cost}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{program.name}: simulated in {seconds:.2f} s ({result['npu_ops']} NPU ops, {result['host_ops']} host ops)")
    for name, shape in result["outputs"].items():
        print(f"  output {name}: {shape}")
    print(f"  cost on {profile.name}: {cost['cycles']:,} cycles = {cost['time_ms']:.3f} ms, {cost['macs']:,} MACs, "
          f"utilisation {cost['utilisation']:.3f}, SRAM peak {cost['sram_peak'] / 1e6:.3f} MB")
    return 0


register_command("simulate", _args, _run, "run an npu-sim program in the simulator; print outputs and cost")
