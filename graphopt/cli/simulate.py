"""`graphopt simulate FOLDER`: run an npu-sim program folder, or a decoder package's prefill and greedy
decode steps, in the simulator and print the cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from graphopt.cli.command import log, register_command, write_output_file

MAX_INPUTS_BYTES = 4 << 30  # an --inputs .npz of feeds


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", help="an npu-sim output folder: one program (program.json + weights.npz) or a "
                                        "decoder package (prefill.*, decode.*, decode_cost.json)")
    parser.add_argument("--inputs", metavar="FEEDS.npz", help="input arrays by name (default: the compile-time example)")
    parser.add_argument("--prompt-ids", metavar="ID,ID,...",
                        help="decoder: the prompt's token ids (default: the package's compile-time prompt)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="decoder: greedy decode steps after the prefill (default: 8)")
    parser.add_argument("--profile", default="default", help="device profile name or YAML path for the cost totals")
    parser.add_argument("--save", metavar="OUT.npz",
                        help="write the outputs here (decoder: prompt_ids, tokens and the logits each was chosen from)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _prompt_ids(text: str) -> list[int]:
    from graphopt.errors import OptionError

    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise OptionError(f"--prompt-ids: expected comma-separated token ids such as 1,2,3, got {text!r}") from None
    return ids


def _run(args) -> int:
    from graphopt.errors import BackendError, OptionError
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
    backend = available_backends()["npu-sim"]
    simulator = backend.from_options({"profile": args.profile})
    decoder = backend.is_decoder_package(program_dir)
    if decoder and args.inputs:
        raise OptionError(f"--inputs: {program_dir} is a decoder package; give its prompt with --prompt-ids")
    if not decoder and (args.prompt_ids is not None or args.steps is not None):
        option = "--prompt-ids" if args.prompt_ids is not None else "--steps"
        raise OptionError(f"{option}: {program_dir} is a single npu-sim program, not a decoder package")
    if args.steps is not None and args.steps < 0:
        raise OptionError(f"--steps: expected a number of decode steps >= 0, got {args.steps}")
    if decoder:
        prompt = _prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
        steps = {} if args.steps is None else {"steps": args.steps}
        result = simulator.simulate_decoder(program_dir, prompt, **steps)
        arrays = {"prompt_ids": np.asarray(result["prompt"], np.int64),
                  "tokens": np.asarray(result["tokens"], np.int64), "logits": result.pop("logits")}
        _save(save, arrays, inputs)
        _print_decoder(result, args.json)
        return 0
    feeds = None
    if args.inputs:
        feeds = read_npz(args.inputs, max_bytes=MAX_INPUTS_BYTES, error=BackendError, what="inputs file")
    result = simulator.simulate(args.program, feeds)
    program, outputs, cost = result.pop("program"), result.pop("outputs"), result["cost"]
    log(f"simulate: {program.name}, {result['npu_ops']} NPU ops, {result['host_ops']} host ops")
    _save(save, outputs, inputs)
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


def _save(path: Path | None, arrays: dict[str, np.ndarray], inputs: list[Path]) -> None:
    if path is None:
        return

    def write(target: Path) -> None:
        with open(target, "wb") as fh:
            np.savez(fh, **arrays)

    log(f"simulate: outputs written to {write_output_file(path, write, inputs)}")


def _print_decoder(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    totals = result["totals"]
    print(f"{result['package']}: a prefill of {len(result['prompt'])} tokens and {len(result['steps']) - 1} greedy "
          f"decode steps, simulated in {result['simulate_s']:.2f} s, cost on {result['profile']}")
    print(f"  {'step':<10} {'token':>7} {'context':>8} {'cycles':>14} {'time (ms)':>11} {'bytes moved':>15}")
    for row in result["steps"]:
        print(f"  {row['step']:<10} {row['token']:>7} {row['context']:>8} {row['cycles']:>14,} "
              f"{row['time_ms']:>11.4f} {row['bytes_moved']:>15,}")
    print(f"  {'total':<10} {len(result['tokens']):>7} {'':>8} {totals['cycles']:>14,} {totals['time_ms']:>11.4f} "
          f"{totals['bytes_moved']:>15,}")
    print(f"  tokens: {' '.join(str(t) for t in result['tokens'])}")


register_command("simulate", _args, _run, "run an npu-sim program or decoder package in the simulator; print its cost")
