"""Sparsity: N:M and unstructured patterns, pruning criteria, and the Optimal Brain Surgeon sweep."""

from graphopt.sparsity.criteria import (
    global_threshold,
    magnitude_scores,
    prune,
    reconstruction_error,
    sparsegpt,
    wanda_scores,
)
from graphopt.sparsity.patterns import (
    Pattern,
    check_pattern,
    from_canonical,
    is_n_m,
    nm_mask,
    parse_pattern,
    sparsity_of,
    to_canonical,
    unstructured_mask,
)

__all__ = [
    "Pattern", "parse_pattern", "to_canonical", "from_canonical", "nm_mask", "unstructured_mask", "check_pattern",
    "is_n_m", "sparsity_of", "magnitude_scores", "wanda_scores", "global_threshold", "sparsegpt", "prune",
    "reconstruction_error",
]
