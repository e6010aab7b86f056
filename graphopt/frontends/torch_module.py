"""torch.nn.Module -> the FX form, traced with torch.export (non-strict)."""

from __future__ import annotations

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.ir import Model, TensorSpec

__all__ = ["from_module"]


def from_module(module, example_inputs: dict[str, np.ndarray], *, dynamic_axes=None,
                output_names: list[str] | None = None, task: str = "generic", name: str = "model",
                sample_inputs: list[dict[str, np.ndarray]] | None = None, tokenizer=None) -> Model:
    """Trace `module` with torch.export (non-strict) into the FX form.

    `dynamic_axes` maps input name -> {axis: dim name}; axes sharing a name share a symbol.
    """
    import torch

    dynamic_axes = dynamic_axes or {}
    shapes = {}
    for input_name in example_inputs:
        axes = {}
        for axis, dim_name in dynamic_axes.get(input_name, {}).items():
            # DYNAMIC lets export derive the range (e.g. BERT's 512 positions) instead of failing on ours
            axes[axis] = torch.export.Dim.DYNAMIC
        shapes[input_name] = axes
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in example_inputs.values())
    module.eval()
    try:
        program = torch.export.export(module, args, dynamic_shapes=tuple(shapes.values()), strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the model's name
        raise ModelLoadError(f"torch.export could not trace '{name}': {type(exc).__name__}: {exc}") from exc
    gm = program.module()
    with torch.no_grad():
        outs = gm(*args)
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    output_names = output_names or [f"output_{i}" for i in range(len(outs))]
    inputs = [
        TensorSpec(n, str(v.dtype), tuple(dynamic_axes.get(n, {}).get(a, s) for a, s in enumerate(v.shape)))
        for n, v in example_inputs.items()
    ]
    outputs = [TensorSpec(n, str(o.dtype).replace("torch.", ""), tuple(o.shape)) for n, o in zip(output_names, outs)]
    return Model(fx=gm, inputs=inputs, outputs=outputs, task=task, name=name,
                 sample_inputs=sample_inputs if sample_inputs is not None else [dict(example_inputs)],
                 tokenizer=tokenizer)
