"""The one exception family graphopt raises for user-facing problems."""

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "UnsafePathError",
    "OptionError",
    "UnsupportedGraphError",
    "PipelineError",
    "RecipeError",
    "BackendError",
]


class GraphoptError(Exception):
    """Base class: a message that names the file, node, tensor or option and says what to do."""


class ModelLoadError(GraphoptError):
    """A model file or directory could not be read (missing, corrupt, truncated, wrong kind)."""


class UnsafePathError(GraphoptError):
    """A path inside a model (external data) or an output path would escape or overwrite an input."""


class OptionError(GraphoptError):
    """A pass or backend option is unknown or has a bad value."""


class UnsupportedGraphError(GraphoptError):
    """A pass or backend cannot handle this graph (wrong IR form, unmatched pattern, missing op)."""


class PipelineError(GraphoptError):
    """A pipeline could not be planned or a pass failed inside it."""


class RecipeError(GraphoptError):
    """A recipe YAML file is malformed; the message names the line and the option."""


class BackendError(GraphoptError):
    """A backend could not emit or validate its artifact."""
