"""Pruners: functions of one weight matrix (out x in) and the Hessian of its inputs. No model knowledge.

SparseGPT (Frantar & Alistarh, 2023) sweeps the columns left to right. Each pruned (or rounded)
weight leaves an error that is pushed onto the columns not yet visited, using rows of the upper
Cholesky factor of H^-1; updates inside a block of columns are applied eagerly, updates to the
columns after the block lazily, as one matrix product per block.

`row_splits` lets several matrices that share one input (q/k/v, gate/up) go through one sweep:
rows never interact in the update, and unstructured masks are still chosen per matrix.

ALPS (Meng et al., 2024) starts from SparseGPT's answer and improves it by ADMM on the same
least-squares objective, the mask re-chosen by projection at every step, then refits the kept
weights by conjugate gradients (see `alps`).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch


def hessian_inverse_factor(H: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damping)^-1, and the mask of dead inputs (zero diagonal).

    With J the reversal permutation and J H J = L L^T (lower Cholesky), H^-1 = U^T U for
    U = J L^-1 J, which is upper triangular with a positive diagonal: the factor SparseGPT needs,
    from one Cholesky and one triangular inverse (2/3 n^3 flops) instead of factoring, inverting and
    factoring again (4/3 n^3). fp32 like the reference; falls back to fp64 when fp32 Cholesky fails.
    """
    Hr = H.detach().float().flip(0, 1)  # J H J, a copy: H itself is left alone
    dead = torch.diag(Hr).flip(0) == 0
    dead_r = dead.flip(0)
    Hr[dead_r, dead_r] = 1.0
    idx = torch.arange(Hr.shape[0], device=Hr.device)
    Hr[idx, idx] += dampening * torch.mean(torch.diag(Hr))
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(Hr.to(dtype))
        if info == 0:
            del Hr  # one n x n matrix less alive at the peak (Llama-3-8B's down_proj input: 0.8 GB each)
            invert_lower_(L)
            return L.flip(0, 1).float(), dead
    raise ValueError("Hessian is not positive definite even in fp64; raise --dampening")


def invert_lower_(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Invert a lower-triangular matrix in place, by halves: [[A, 0], [C, D]]^-1 is
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]], so nearly all the work runs as triangular solves (BLAS 3)."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    h = n // 2
    A, C, D = L[:h, :h], L[h:, :h], L[h:, h:]
    # C <- -D^-1 C A^-1 by two triangular solves (half the flops of products with the inverses)
    CA = torch.linalg.solve_triangular(A, C, upper=False, left=False)
    C.copy_(torch.linalg.solve_triangular(D, CA, upper=False).neg_())
    del CA
    invert_lower_(A, leaf)
    invert_lower_(D, leaf)
    return L


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
                mask[start:start + rows] = _lowest_count(part.reshape(-1), k).view(part.shape)
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
              factor: tuple[torch.Tensor, torch.Tensor] | None = None,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W (out x in) with SparseGPT. Returns (new weight in fp32, pruned-mask, loss).

    sparsity: fraction pruned (unstructured; mask chosen adaptively per block of columns).
    n, m:     n:m pattern (n of every m consecutive inputs pruned), chosen inside the sweep.
    quantizer: optional callable mapping a column (fp32, rows) onto its grid; joint pruning and
               quantization: kept weights are rounded before their error is propagated. One with a
               `group_size` (grid.GroupQuantizer) has fix(index, W_group) called as the sweep reaches
               each group's first column, with the group's current weights (rows x group_size).
    factor:   hessian_inverse_factor(H, dampening), when the caller already has it.
    mask:     a fixed pruned-mask (True = pruned) instead of choosing one: the sweep then only quantizes the
              kept weights (GPTQ under a given mask), or only re-solves them if there is no quantizer.
    loss:     sum over weights of err^2 / 2 (the OBS estimate of the output error increase).
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    check_pattern(cols, n, m)
    U, dead = factor if factor is not None else hessian_inverse_factor(H, dampening)
    W[:, dead] = 0
    fixed = mask
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = 0.0
    if n and blocksize % m:
        blocksize = blocksize - blocksize % m or m
    group = getattr(quantizer, "group_size", 0)     # a GroupQuantizer: scales fixed as the sweep reaches a group
    if group and blocksize % group and group % blocksize:
        raise ValueError(f"blocksize {blocksize} and group size {group}: one must divide the other")

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].t().contiguous()            # count x rows: one column per row, contiguous
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        if fixed is not None:
            M1 = fixed[:, i1:i2].t().contiguous()
        elif n:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = ((W1 / d[:, None]) ** 2).t()        # rows x count
            M1 = _lowest_fraction(score, sparsity, row_splits).t().contiguous()
        E1 = torch.empty_like(W1)
        inv_d = (1.0 / d)[:, None]
        for i in range(count):
            if n and fixed is None and i % m == 0:
                score = (W1[i:i + m] / d[i:i + m, None]) ** 2          # m x rows
                idx = torch.topk(score, n, dim=0, largest=False).indices
                M1[i:i + m].scatter_(0, idx, True)
            if group and (i1 + i) % group == 0:          # a group's scales: from its weights as they are now
                quantizer.fix(i1 + i, torch.cat([W1[i:i + group].t(), W[:, i2:i1 + i + group]], dim=1),
                              importance=U.diagonal()[i1 + i:i1 + i + group] ** -2)
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


def _kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a flat tensor, exactly. Large tensors: a sorted strided sample
    brackets it, and only the values inside the bracket are searched (kthvalue of all is the fallback)."""
    n = x.numel()
    step = n // 16384
    if step >= 8:
        sample = torch.sort(x[::step]).values
        at, margin = k / n * sample.numel(), 4 * sample.numel() ** 0.5 + 8
        lo = sample[max(int(at - margin), 0)]
        hi = sample[min(int(at + margin), sample.numel() - 1)]
        below = int((x < lo).sum())
        band = x[(x >= lo) & (x <= hi)]
        if 1 <= k - below <= band.numel():
            return torch.kthvalue(band, k - below).values
    return torch.kthvalue(x, k).values


def _lowest_count(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat) of exactly k lowest entries of a flat score; ties at the k-th value go to the
    first positions. One k-th value and a comparison (cheaper than topk)."""
    if k <= 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k >= score.numel():
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    kth = _kth_smallest(score, k)
    mask = score < kth
    short = k - int(mask.sum())
    if short:                                   # equal scores at the threshold: the first `short` of them
        mask[torch.nonzero(score == kth).flatten()[:short]] = True
    return mask


def _project(B: torch.Tensor, sparsity: float, n: int, m: int, splits: list[int]) -> torch.Tensor:
    """Pruned-mask of the Euclidean projection of B onto the constraint: the smallest |B| of each
    matrix of `splits` (unstructured), or of each group of m inputs (n:m)."""
    score = B * B
    if n:
        return _nm_mask(score, n, m)
    mask = torch.empty(B.shape, dtype=torch.bool, device=B.device)
    start = 0
    for rows in splits:
        part = score[start:start + rows].reshape(-1)
        mask[start:start + rows] = _lowest_count(part, int(part.numel() * sparsity)).view(rows, -1)
        start += rows
    return mask


def _masked_cg(Hn: torch.Tensor, G: torch.Tensor, X: torch.Tensor, keep: torch.Tensor, iters: int) -> torch.Tensor:
    """Conjugate gradients for the kept weights: each row x solves x_S Hn_SS = G_S on its support S.

    Hn has a unit diagonal (inputs scaled by their norms), so this is CG preconditioned by Jacobi.
    """
    keep = keep.to(X.dtype)
    X = X * keep
    R = (G - X @ Hn).mul_(keep)
    P = R.clone()
    rs = torch.linalg.vecdot(R, R)[:, None]
    for _ in range(iters):
        AP = (P @ Hn).mul_(keep)
        alpha = rs / torch.linalg.vecdot(P, AP)[:, None].clamp_min(1e-30)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        rs_new = torch.linalg.vecdot(R, R)[:, None]
        P.mul_(rs_new / rs.clamp_min(1e-30)).add_(R)
        rs = rs_new
    return X.mul_(keep)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W_new - W) H (W_new - W)^T) / 2: how much the layer's outputs move (H = 2 X^T X / tokens)."""
    D = (W_new.float() - W.float())
    return float(((D @ H.float()) * D).sum()) / 2


RHO_EVERY = 3   # ALPS iterations between penalty updates


def _shifted_inverse(Hn: torch.Tensor, rho: float) -> torch.Tensor:
    """(Hn + rho I)^-1 through a Cholesky factor (fp64 if fp32 fails)."""
    A = Hn.clone()
    A.diagonal().add_(rho)
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(A.to(dtype))
        if info == 0:
            return torch.cholesky_inverse(L).float()
    raise ValueError("Hn + rho I is not positive definite; raise --dampening")


def alps(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, blocksize: int = 128,
         dampening: float = 0.01, row_splits: list[int] | None = None, quantizer: Callable | None = None,
         factor: tuple[torch.Tensor, torch.Tensor] | None = None, iters: int = 20, rho: float = 0.3,
         rho_growth: float = 1.2, cg_iters: int = 5) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W (out x in) with ALPS-style ADMM (Meng et al., 2024). Returns (new weight fp32, pruned-mask, loss).

    min ||X (B - W)||^2 subject to the sparsity constraint, split as B = D with D sparse:
        B <- (W Hn - V + rho D) (Hn + rho I)^-1,   D <- projection of B + V / rho,   V <- V + rho (B - D),
    on inputs scaled to unit Hessian diagonal (Hn), rho growing by rho_growth per iteration (applied every
    RHO_EVERY iterations, when (Hn + rho I)^-1 is rebuilt), so D's mask moves freely at first and settles
    as rho grows; it stops early once the mask has not moved for 3 iterations. It starts at the SparseGPT
    solution with V its dual (then B = D, and the first projection is a gradient step from it). The final
    mask's weights are refit by conjugate gradients. Of this and the SparseGPT start, the one with the
    lower reconstruction error is returned, so a layer is never worse than SparseGPT leaves it.
    Masks: per matrix of row_splits (unstructured) or per group of m inputs (n:m); dead inputs stay 0.
    quantizer: joint quantization (--wbits): with the mask found, a SparseGPT sweep under that fixed mask
    rounds the kept weights column by column and moves each rounding error onto the columns not yet rounded
    (GPTQ on the ALPS solution); zeros stay zero.
    loss: reconstruction_error of the result.
    """
    if quantizer is not None:
        out, pruned, _ = alps(W, H, sparsity, n, m, blocksize, dampening, row_splits, None, factor, iters, rho,
                              rho_growth, cg_iters)
        out, _, _ = sparsegpt(out, H, sparsity, n, m, blocksize, dampening, row_splits, quantizer, factor,
                              mask=pruned)
        return out, pruned, reconstruction_error(W.detach().float(), out, H)
    W = W.detach().float().clone()
    rows, cols = W.shape
    check_pattern(cols, n, m)
    splits = _split_rows(rows, row_splits)
    Ws, Ms, _ = sparsegpt(W, H, sparsity, n, m, blocksize, dampening, row_splits, factor=factor)
    H = H.detach().float()
    Hd = H.clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(dampening * torch.mean(torch.diag(Hd)))
    scale = torch.sqrt(torch.diag(Hd))
    Hn = Hd / scale[:, None] / scale[None, :]
    del Hd
    W[:, dead] = 0
    B0 = W * scale
    G = B0 @ Hn                                       # the linear term: W Hn in scaled coordinates

    D = Ws * scale
    V = G - D @ Hn                                    # the dual that makes D a fixed point of the B-step
    mask, still, inverse = Ms, 0, None
    for t in range(iters):
        if t % RHO_EVERY == 0:                        # a new penalty, and the inverse that goes with it
            rho_t = rho * rho_growth ** t
            inverse = _shifted_inverse(Hn, rho_t)
        B = torch.add(G, D, alpha=rho_t).sub_(V) @ inverse
        U = torch.add(B, V, alpha=1.0 / rho_t)
        new_mask = _project(U, sparsity, n, m, splits)
        D = U.masked_fill_(new_mask, 0.0)
        V.add_(B, alpha=rho_t).sub_(D, alpha=rho_t)
        still = still + 1 if torch.equal(new_mask, mask) else 0
        mask = new_mask
        if still >= 3:
            break
    del V, inverse
    candidates = [(Ws, Ms), (_masked_cg(Hn, G, D, ~mask, cg_iters) / scale, mask)]
    errors = [reconstruction_error(W, c, H) for c, _ in candidates]
    best = min(range(len(candidates)), key=lambda i: errors[i])
    out, pruned = candidates[best]
    out[:, dead] = 0
    return out, pruned, errors[best]


@dataclass(frozen=True)
class Pruner:
    """A pruning function and what it needs from the driver.

    needs_calibration: it reads the Hessian, so the driver runs calibration text through the layers.
    shares_factor:     it takes `factor=hessian_inverse_factor(H)`, so modules reading one input share it.
    joint_quant:       it takes a `quantizer` and rounds kept weights inside its sweep (--wbits).
    options:           {recipe field: keyword argument} of its own settings, passed from the recipe.
    """

    fn: Callable
    title: str                 # how reports name it
    needs_calibration: bool
    shares_factor: bool = False
    joint_quant: bool = False
    options: dict = field(default_factory=dict)


PRUNERS = {
    "sparsegpt": Pruner(sparsegpt, "SparseGPT", needs_calibration=True, shares_factor=True, joint_quant=True),
    "wanda": Pruner(wanda, "Wanda", needs_calibration=True),
    "magnitude": Pruner(magnitude, "magnitude pruning", needs_calibration=False),
    "alps": Pruner(alps, "ALPS", needs_calibration=True, shares_factor=True, joint_quant=True,
                   options={"alps_iters": "iters", "alps_rho": "rho", "alps_rho_growth": "rho_growth",
                            "alps_cg_iters": "cg_iters"}),
}
