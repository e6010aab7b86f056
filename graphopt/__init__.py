"""graphopt: a compiler-style graph transformation toolkit that makes models fit on phones and NPUs.

    import graphopt
    model = graphopt.load("model.onnx")                 # or sample:NAME, a .gguf, a Hugging Face folder
    result = graphopt.Pipeline([graphopt.passes.Quantize(weight_bits=8)]).run(model, calib=feeds)
    result.model.save("out/model.onnx")

Names are imported on first use, so `import graphopt` (and the `graphopt` command's start-up) stays
light; the submodules hold the implementations.
"""

import importlib

__all__ = ["load", "Model", "ModelMeta", "TensorSpec", "Pipeline", "PipelineResult", "GraphoptError", "diff",
           "export", "lower", "generate", "passes", "backends"]
__version__ = "0.1.0"

_LAZY = {
    "load": ("graphopt.frontends", "load"),
    "Model": ("graphopt.ir", "Model"),
    "ModelMeta": ("graphopt.ir", "ModelMeta"),
    "TensorSpec": ("graphopt.ir", "TensorSpec"),
    "Pipeline": ("graphopt.pipeline", "Pipeline"),
    "PipelineResult": ("graphopt.pipeline", "PipelineResult"),
    "GraphoptError": ("graphopt.errors", "GraphoptError"),
    "export": ("graphopt.pipeline", "export"),
    "lower": ("graphopt.lowering", "lower"),
    "generate": ("graphopt.evaluation.generation", "generate"),
    "passes": ("graphopt.passes", None),
    "backends": ("graphopt.backends", None),
}


def diff(a, b):
    """Structural difference between two models (see `graphopt.analysis.diff.GraphDiff`)."""
    from graphopt.analysis.diff import diff_models

    return diff_models(a, b)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
