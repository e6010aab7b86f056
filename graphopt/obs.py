"""The Optimal Brain Surgeon column sweep that GPTQ and SparseGPT share (Frantar et al. 2022, 2023).

Both visit the input columns of a weight W [out, in] in order, replace each column by a cheaper
one (rounded to a grid, or with entries pruned) and spread the column's error over the columns
not yet visited, weighted by the upper Cholesky factor of H⁻¹ (H = 2/n·XᵀX of the layer's
inputs). Columns go in blocks: inside a block each error is applied at once to the block's
remaining columns, and the block's errors reach the later columns in one matmul (lazy batch
update). What to put in place of a column is the caller's `replace`; the sweep is the same.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from graphopt.errors import UnsupportedGraphError

__all__ = ["prepare", "sweep"]

# replace(j, block, i) -> the new values of column j (= block[:, i]); `block` holds the columns of
# the current block with every earlier column's error already applied
Replace = Callable[[int, torch.Tensor, int], torch.Tensor]


def prepare(w: np.ndarray, hessian: np.ndarray, dampening: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as float32 torch [out, in], upper Cholesky factor of (H + damp)⁻¹ as float32).

    Inputs that never fire (zero Hessian diagonal) get a unit diagonal and zero weights;
    `dampening`·mean(diag H) is added to the diagonal, more if H is still not positive definite.
    `what` names the weight in the error raised when nothing helps.
    """
    W = torch.tensor(w, dtype=torch.float32)
    H = torch.tensor(hessian, dtype=torch.float64)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise UnsupportedGraphError(f"{what}: Hessian {tuple(H.shape)} does not fit weight {tuple(W.shape)}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale = torch.mean(torch.diag(H)).item()
    H += dampening * scale * torch.eye(cols, dtype=H.dtype)
    extra = 0.0
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + extra * torch.eye(cols, dtype=H.dtype))
            return W, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            extra = scale * 0.01 if extra == 0 else extra * 10
    raise UnsupportedGraphError(f"{what}: the calibration Hessian is not positive definite even after dampening")


def sweep(W: torch.Tensor, hinv: torch.Tensor, replace: Replace, blocksize: int = 128) -> torch.Tensor:
    """Replace every column of W (in place) in order, compensating each column's error on the
    columns after it; returns W with every column replaced."""
    cols = W.shape[1]
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block = W[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            new = replace(start + i, block, i)
            err = (column - new) / hblock[i, i]
            block[:, i + 1:] -= err[:, None] * hblock[i, i + 1:][None, :]
            block[:, i] = new
            errors[:, i] = err
        W[:, start:stop] = block
        W[:, stop:] -= errors @ hinv[start:stop, stop:]
    return W
