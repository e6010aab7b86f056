"""graphopt.backends: one module (or package) per target; importing this package registers them all and
exposes each one's public names (`graphopt.backends.OrtMobile`)."""

from graphopt.pipeline.registry import import_members

__all__ = import_members(__name__, __path__, globals())
