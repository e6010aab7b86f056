"""graphopt.passes: one module per pass; importing this package registers them all and exposes
each module's public names, so `graphopt.passes.Quantize(weight_bits=4)` builds a pass."""

from graphopt.pipeline.registry import import_members

__all__ = import_members(__name__, __path__, globals())
