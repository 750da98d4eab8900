"""Pruners: functions of one weight matrix (out x in) and the Hessian of its inputs. No model knowledge.

SparseGPT (Frantar & Alistarh, 2023) sweeps the columns left to right. Each pruned (or rounded)
weight leaves an error that is pushed onto the columns not yet visited, using rows of the upper
Cholesky factor of H^-1; updates inside a block of columns are applied eagerly, updates to the
columns after the block lazily, as one matrix product per block.

`row_splits` lets several matrices that share one input (q/k/v, gate/up) go through one sweep:
rows never interact in the update, and unstructured masks are still chosen per matrix.
"""

from dataclasses import dataclass
from typing import Callable

import torch


def hessian_inverse_factor(H: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damping)^-1, and the mask of dead inputs (zero diagonal).

    fp32 like the reference; falls back to fp64 when fp32 Cholesky fails.
    """
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += dampening * torch.mean(torch.diag(H))
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(H.to(dtype))
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L  # one n x n matrix less alive at the peak (Llama-3-8B's down_proj input: 0.8 GB each)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return U.float(), dead
    raise ValueError("Hessian is not positive definite even in fp64; raise --dampening")


def _split_rows(rows, row_splits):
    splits = list(row_splits) if row_splits else [rows]
    if sum(splits) != rows:
        raise ValueError(f"row_splits {splits} do not add up to {rows} rows")
    return splits


def _lowest_fraction(score, fraction, row_splits, per_row=False):
    """Boolean mask of the `fraction` lowest scores, counted per row or per matrix of each split."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    start = 0
    for rows in _split_rows(score.shape[0], row_splits):
        part = score[start:start + rows]
        if per_row:
            k = int(part.shape[1] * fraction)
            if k:
                idx = torch.topk(part, k, dim=1, largest=False).indices
                mask[start:start + rows].scatter_(1, idx, True)
        else:
            k = int(part.numel() * fraction)
            if k:
                idx = torch.topk(part.flatten(), k, largest=False).indices
                mask[start:start + rows].view(-1)[idx] = True
        start += rows
    return mask


def _nm_mask(score, n, m):
    """Within each group of m consecutive columns, mark the n lowest scores (score: rows x cols)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def check_pattern(cols: int, n: int, m: int) -> None:
    if n and cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of m={m} for an {n}:{m} pattern")


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, blocksize: int = 128,
              dampening: float = 0.01, row_splits: list[int] | None = None, quantizer: Callable | None = None,
              factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W (out x in) with SparseGPT. Returns (new weight in fp32, pruned-mask, loss).

    sparsity: fraction pruned (unstructured; mask chosen adaptively per block of columns).
    n, m:     n:m pattern (n of every m consecutive inputs pruned), chosen inside the sweep.
    quantizer: optional callable mapping a column (fp32, rows) onto its grid; joint pruning and
               quantization: kept weights are rounded before their error is propagated.
    factor:   hessian_inverse_factor(H, dampening), when the caller already has it.
    loss:     sum over weights of err^2 / 2 (the OBS estimate of the output error increase).
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    check_pattern(cols, n, m)
    U, dead = factor if factor is not None else hessian_inverse_factor(H, dampening)
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = 0.0
    if n and blocksize % m:
        blocksize = blocksize - blocksize % m or m

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].t().contiguous()            # count x rows: one column per row, contiguous
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        if n:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = ((W1 / d[:, None]) ** 2).t()        # rows x count
            M1 = _lowest_fraction(score, sparsity, row_splits).t().contiguous()
        E1 = torch.empty_like(W1)
        inv_d = (1.0 / d)[:, None]
        for i in range(count):
            if n and i % m == 0:
                score = (W1[i:i + m] / d[i:i + m, None]) ** 2          # m x rows
                idx = torch.topk(score, n, dim=0, largest=False).indices
                M1[i:i + m].scatter_(0, idx, True)
            w = W1[i]
            if quantizer is None:
                torch.mul(w.masked_fill(~M1[i], 0.0), inv_d[i], out=E1[i])
            else:
                q = quantizer(w, i1 + i).masked_fill(M1[i], 0.0)
                torch.mul(w - q, inv_d[i], out=E1[i])
            W1[i:].addr_(U1[i, i:], E1[i], alpha=-1.0)
        # the sweep leaves pruned weights at ~0 and kept ones at their rounded values; make it exact
        if quantizer is None:
            W1.masked_fill_(M1, 0.0)
        else:
            for i in range(count):
                W1[i] = quantizer(W1[i], i1 + i).masked_fill(M1[i], 0.0)
        loss += float((E1 ** 2).sum()) / 2
        W[:, i1:i2] = W1.t()
        mask[:, i1:i2] = M1.t()
        if i2 < cols:
            W[:, i2:].addmm_(E1.t(), U[i1:i2, i2:], alpha=-1.0)
    return W, mask, loss


def wanda(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
          row_splits: list[int] | None = None, **_) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Wanda (Sun et al., 2023): |W| times input norm, pruned per output row. No weight update."""
    W = W.detach().float().clone()
    check_pattern(W.shape[1], n, m)
    score = W.abs() * torch.sqrt(torch.diag(H).float().clamp_min(0))[None, :]
    mask = _nm_mask(score, n, m) if n else _lowest_fraction(score, sparsity, row_splits, per_row=True)
    return W.masked_fill_(mask, 0.0), mask, None


def magnitude(W: torch.Tensor, H: torch.Tensor | None = None, sparsity: float = 0.5, n: int = 0, m: int = 0,
              row_splits: list[int] | None = None, **_) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Magnitude pruning: smallest |W| per matrix (unstructured) or per group of m (n:m)."""
    W = W.detach().float().clone()
    check_pattern(W.shape[1], n, m)
    mask = _nm_mask(W.abs(), n, m) if n else _lowest_fraction(W.abs(), sparsity, row_splits)
    return W.masked_fill_(mask, 0.0), mask, None


@dataclass(frozen=True)
class Pruner:
    """A pruning function and what it needs from the driver.

    needs_calibration: it reads the Hessian, so the driver runs calibration text through the layers.
    shares_factor:     it takes `factor=hessian_inverse_factor(H)`, so modules reading one input share it.
    joint_quant:       it takes a `quantizer` and rounds kept weights inside its sweep (--wbits).
    """

    fn: Callable
    title: str                 # how reports name it
    needs_calibration: bool
    shares_factor: bool = False
    joint_quant: bool = False


PRUNERS = {
    "sparsegpt": Pruner(sparsegpt, "SparseGPT", needs_calibration=True, shares_factor=True, joint_quant=True),
    "wanda": Pruner(wanda, "Wanda", needs_calibration=True),
    "magnitude": Pruner(magnitude, "magnitude pruning", needs_calibration=False),
}
