"""Helpers for the FX form (a torch.export GraphModule): reading and replacing its weights."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["get_weight", "set_parameter"]


def get_weight(gm, name: str) -> torch.Tensor:
    """The parameter or buffer `name` ('model.layers.0.mlp.up_proj.weight') of `gm`."""
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def set_parameter(gm, name: str, value) -> None:
    """Replace the parameter (or buffer) `name` of `gm` by `value` (numpy or torch, cast to the old
    dtype and device), under every name it has: a tied table is one Parameter with two names.

    Replaced, never written into, so a model that shares a weight with another is not changed."""
    old = get_weight(gm, name)
    data = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.detach()
    data = data.to(device=old.device, dtype=old.dtype)
    if not isinstance(old, torch.nn.Parameter):
        owner, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, data)
        return
    new = torch.nn.Parameter(data, requires_grad=old.requires_grad)
    for full, param in list(gm.named_parameters(remove_duplicate=False)):
        if param is old:
            owner, _, leaf = full.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, leaf, new)
