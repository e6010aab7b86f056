"""The bench command line: `python -m bench list | run SUITE | report` (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.report import RESULTS_MD, render, render_suite, write_report
from bench.runner import RESULTS, load_results, run_suite, write_result
from bench.spec import load_protocol, load_suites
from graphopt.errors import GraphoptError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the suites, their tables and rows")
    run = sub.add_parser("run", help="measure one suite and print its tables")
    run.add_argument("suite")
    run.add_argument("--json", nargs="?", const="", metavar="PATH",
                     help="write the result (default: bench/results/SUITE.json, the suite's latest result)")
    run.add_argument("--only", nargs="+", metavar="ROW", help="measure only these rows (and those they compare with)")
    run.add_argument("--device", default="cpu", help="torch device of training rows (cpu, cuda)")
    report = sub.add_parser("report", help="regenerate bench/RESULTS.md from bench/results/*.json")
    report.add_argument("--check", action="store_true", help="only check that bench/RESULTS.md is up to date")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        suites = load_suites()
        if args.command == "list":
            for suite in suites.values():
                print(f"{suite.name}: {suite.title}")
                for table in suite.tables:
                    print(f"  {table.name} ({table.model}, {table.measure}): {', '.join(r.name for r in table.rows)}")
            return 0
        if args.command == "report":
            return _report(suites, args.check)
        if args.suite not in suites:
            print(f"error: no suite '{args.suite}' (suites: {', '.join(suites)})", file=sys.stderr)
            return 2
        if args.only and args.json == "":
            print("error: --only measures part of a suite; give --json a PATH other than the suite's latest result",
                  file=sys.stderr)
            return 2
        command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        result = run_suite(suites[args.suite], load_protocol(), device=args.device, only=args.only,
                           command=command, log=log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_suite(suites[args.suite], result))
    if args.json is not None:
        log(f"bench: result written to {write_result(result, Path(args.json) if args.json else None)}")
    return 0


def _report(suites, check: bool) -> int:
    results = load_results(RESULTS)
    if check:
        current = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.is_file() else ""
        if current != render(suites, results):
            print(f"{RESULTS_MD} is not what `python -m bench report` generates from {RESULTS}", file=sys.stderr)
            return 1
        return 0
    print(write_report(suites, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
