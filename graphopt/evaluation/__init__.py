"""Evaluation: fidelity metrics (one implementation each), LM evaluation, latency, sizes, tables."""
