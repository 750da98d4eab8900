"""The pruners against independent references: a naive column-by-column OBS sweep and brute-force checks."""

import pytest
import torch

from sparse_export.pruning.pruners import hessian_inverse_factor, invert_lower_, magnitude, sparsegpt, wanda


def correlated_inputs(cols, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols // 2, cols, generator=g)
    X = torch.randn(tokens, cols // 2, generator=g) @ basis + 0.3 * torch.randn(tokens, cols, generator=g)
    X *= torch.rand(cols, generator=g) * 2 + 0.1          # uneven feature scales
    return X


def hessian(X):
    return 2 * X.T @ X / X.shape[0]


def naive_obs(W, H, sparsity=0.5, n=0, m=0, blocksize=128, dampening=0.01):
    """Textbook OBS, one column at a time, in fp64, with the inverse of the remaining columns'
    Hessian recomputed from scratch at every step (no Cholesky, no lazy batching)."""
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)

    def own_diag(j0, j1):  # [H_F^-1]_jj with F = {j, ..., cols-1}, for j in j0..j1-1
        return torch.tensor([torch.linalg.inv(H[k:, k:])[0, 0].item() for k in range(j0, j1)],
                            dtype=H.dtype)

    for j in range(cols):
        if not n and j % blocksize == 0:
            j1 = min(j + blocksize, cols)
            score = W[:, j:j1] ** 2 / own_diag(j, j1)
            k = int(score.numel() * sparsity)
            order = torch.argsort(score.flatten())[:k]
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[order] = True
            mask[:, j:j1] = block.view(score.shape)
        if n and j % m == 0:
            score = W[:, j:j + m] ** 2 / own_diag(j, j + m)
            for r in range(rows):
                for c in torch.argsort(score[r])[:n]:
                    mask[r, j + c] = True
        Hinv = torch.linalg.inv(H[j:, j:])
        err = W[:, j] * mask[:, j] / Hinv[0, 0]
        W[:, j:] -= torch.outer(err, Hinv[0, :])
        W[mask[:, j], j] = 0
    return W, mask


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7, blocksize=16),
                                dict(n=2, m=4), dict(n=1, m=4, blocksize=8)])
def test_lazy_blocked_sparsegpt_equals_naive_obs(kw):
    torch.manual_seed(1)
    rows, cols = 12, 48
    X = correlated_inputs(cols)
    H = hessian(X)
    W = torch.randn(rows, cols)
    kw.setdefault("blocksize", 16)
    ours, mask, _ = sparsegpt(W, H, **kw)
    ref, ref_mask = naive_obs(W, H, **kw)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-4)


def test_dead_inputs_are_zeroed_and_do_not_break_the_factor():
    X = correlated_inputs(32)
    X[:, 5] = 0
    H = hessian(X)
    W = torch.randn(8, 32)
    new, mask, _ = sparsegpt(W, H, sparsity=0.5, blocksize=8)
    assert torch.all(new[:, 5] == 0)
    U, dead = hessian_inverse_factor(H)
    assert dead[5] and torch.all(torch.isfinite(U))


@pytest.mark.parametrize("n", [1, 7, 256, 300, 613])
def test_invert_lower_matches_a_general_inverse(n):
    g = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64)) / n ** 0.5
    L.diagonal().copy_(1.0 + torch.rand(n, generator=g, dtype=torch.float64))
    ref = torch.linalg.inv(L)
    ours = invert_lower_(L.clone(), leaf=64)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert torch.all(torch.triu(ours, 1) == 0)


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    X = correlated_inputs(300)
    X[:, 11] = 0
    H = hessian(X)
    U, dead = hessian_inverse_factor(H, dampening=0.01)
    Hd = H.double().clone()
    Hd[11, 11] = 1.0
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)   # independent: invert, then factor
    assert dead.tolist() == [i == 11 for i in range(300)]
    torch.testing.assert_close(U.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def brute_force_nm_ok(W, n, m):
    rows, cols = W.shape
    for r in range(rows):
        for c in range(0, cols, m):
            if sum(1 for x in W[r, c:c + m].tolist() if x == 0) < n:
                return False
    return True


@pytest.mark.parametrize("pruner", [sparsegpt, wanda, magnitude])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_nm_masks_are_exact(pruner, n, m):
    cols = 48
    H = hessian(correlated_inputs(cols))
    W = torch.randn(16, cols)
    new, mask, _ = pruner(W, H, n=n, m=m, blocksize=24)
    assert brute_force_nm_ok(new, n, m)
    assert int(mask.sum()) == 16 * cols * n // m
    assert torch.all(new[mask] == 0)


@pytest.mark.parametrize("pruner", [sparsegpt, wanda, magnitude])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_sparsity_is_exact(pruner, sparsity):
    cols = 64
    H = hessian(correlated_inputs(cols))
    W = torch.randn(20, cols)
    new, mask, _ = pruner(W, H, sparsity=sparsity, blocksize=32)
    if pruner is wanda:  # per output row
        assert all(int(r.sum()) == int(cols * sparsity) for r in mask)
    elif pruner is sparsegpt:  # per block of columns
        for b in range(0, cols, 32):
            assert int(mask[:, b:b + 32].sum()) == int(20 * 32 * sparsity)
    else:
        assert int(mask.sum()) == int(mask.numel() * sparsity)
    assert torch.all(new[mask] == 0) and torch.all(new[~mask] != 0)


def test_row_splits_prune_each_matrix_like_alone():
    """q/k/v go through one sweep; each must come out exactly as if pruned alone."""
    cols = 64
    H = hessian(correlated_inputs(cols))
    parts = [torch.randn(r, cols) for r in (16, 8, 8)]
    joint, _, _ = sparsegpt(torch.cat(parts), H, sparsity=0.5, blocksize=32, row_splits=[16, 8, 8])
    alone = torch.cat([sparsegpt(p, H, sparsity=0.5, blocksize=32)[0] for p in parts])
    torch.testing.assert_close(joint, alone)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(kw):
    torch.manual_seed(0)
    cols = 128
    X = correlated_inputs(cols, tokens=4096)
    H = hessian(X)
    W = torch.randn(64, cols)
    errs = {}
    for pruner in (sparsegpt, wanda, magnitude):
        new, _, _ = pruner(W, H, **kw)
        errs[pruner.__name__] = float(torch.linalg.norm(X @ W.T - X @ new.T))
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_deterministic():
    H = hessian(correlated_inputs(64))
    W = torch.randn(16, 64)
    a = sparsegpt(W, H, sparsity=0.6, blocksize=16)
    b = sparsegpt(W, H, sparsity=0.6, blocksize=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_joint_quantization_keeps_grid_and_zeros():
    H = hessian(correlated_inputs(64))
    W = torch.randn(16, 64)
    scale = W.abs().amax(dim=1) / 127

    def q(col, _):
        return torch.clamp(torch.round(col / scale), -128, 127) * scale

    new, mask, _ = sparsegpt(W, H, sparsity=0.5, blocksize=16, quantizer=q)
    ints = new / scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert torch.all(new[mask] == 0)
    assert float(mask.float().mean()) == 0.5
