"""graphopt: a compiler-style graph transformation toolkit that makes models fit on phones and NPUs."""

from graphopt.errors import GraphoptError
from graphopt.frontends import load
from graphopt.ir import Model, ModelMeta, TensorSpec
from graphopt.pipeline import Pipeline, PipelineResult

__all__ = ["load", "Model", "ModelMeta", "TensorSpec", "Pipeline", "PipelineResult", "GraphoptError", "diff", "export", "lower"]
__version__ = "0.1.0"


def diff(a, b):
    """Structural difference between two models (see `graphopt.analysis.diff.GraphDiff`)."""
    from graphopt.analysis.diff import diff_models

    return diff_models(a, b)


def lower(model, **kwargs):
    """FX form -> ONNX form (cached); see `graphopt.lowering.lower`."""
    from graphopt.lowering import lower as _lower

    return _lower(model, **kwargs)


def export(model, backend: str, out_dir, options: dict | None = None):
    """Emit `model` with a backend ("ort-mobile", "qnn", "npu-sim") and validate the artifact."""
    from graphopt.pipeline import export as _export

    return _export(model, backend, out_dir, options)


def __getattr__(name: str):
    """`graphopt.passes` and `graphopt.backends` import on first use (they register every pass and
    backend, which `import graphopt` alone should not pay for)."""
    if name in ("passes", "backends"):
        import importlib

        return importlib.import_module(f"graphopt.{name}")
    raise AttributeError(f"module 'graphopt' has no attribute '{name}'")
