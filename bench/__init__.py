"""graphopt's benchmark suites: one protocol and the suites as data, one runner, a generated RESULTS.md.

    python -m bench list                       the suites, their tables and rows
    python -m bench run SUITE [--json [PATH]]  measure a suite (the latest result: bench/results/SUITE.json)
    python -m bench report [--check]           regenerate bench/RESULTS.md from bench/results/*.json

bench/protocol.yaml declares how everything is measured, bench/suites.yaml what is measured
(model x rows x metrics, with a paragraph per table); bench.spec reads both, bench.runner runs,
bench.report renders.
"""
