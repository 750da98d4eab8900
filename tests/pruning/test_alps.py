"""ALPS against SparseGPT and a brute-force optimum on tiny problems: its reconstruction error, its masks
(n:m, per matrix of row_splits, dead inputs), its conjugate-gradient refit against an exact solve."""

import itertools
from dataclasses import replace

import pytest
import torch

from sparse_export.pruning.pruners import (_kth_smallest, _lowest_count, _masked_cg, alps, magnitude,
                                           reconstruction_error, sparsegpt, wanda)


def problem(rows, cols, seed=0, tokens=512, corr=0.9):
    """Weights and the Hessian 2 X^T X / tokens of inputs with correlated, unequally scaled columns."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + corr * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ mix * (0.2 + 2 * torch.rand(cols, generator=g))
    return torch.randn(rows, cols, generator=g), 2 * X.t() @ X / tokens


def error(fn, W, H, **kw):
    Wn, mask, _ = fn(W, H, **kw)
    return reconstruction_error(W, Wn, H)


def beats_sparsegpt(fn, seeds=range(3), **kw) -> bool:
    """At most SparseGPT's reconstruction error on every problem, and below 0.95 x it on average."""
    ratios = []
    for seed in seeds:
        W, H = problem(48, 128, seed)
        ratios.append(error(fn, W, H, **kw) / error(sparsegpt, W, H, **kw))
    return max(ratios) <= 1 + 1e-6 and sum(ratios) / len(ratios) < 0.95


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n=2, m=4)])
def test_alps_beats_sparsegpt_and_solvers_that_ignore_H_do_not(kw):
    assert beats_sparsegpt(alps, **kw)
    assert not beats_sparsegpt(magnitude, **kw)
    assert not beats_sparsegpt(wanda, **kw)


def _row_error(w, H, pruned):
    """Half the reconstruction error of one row with the inputs `pruned` zeroed, the rest refit exactly."""
    S = [j for j in range(len(w)) if j not in pruned]
    new = torch.zeros_like(w)
    if S:
        new[S] = torch.linalg.solve(H[S][:, S], w @ H[:, S])
    return reconstruction_error(w[None], new[None], H)


def brute_force_optimum(W, H, pattern):
    """The lowest reconstruction error over every allowed mask. Rows are independent once their supports
    are fixed: unstructured, the best split of the per-matrix budget over rows from each row's best
    error for every count (all subsets tried); 2:4, the sum of each row's best over all its 2:4 masks."""
    Wd, Hd = W.double(), H.double()
    rows, cols = W.shape
    if pattern == "2:4":
        choices = [sum(c, ()) for c in itertools.product(
            *[[tuple(g * 4 + i for i in pair) for pair in itertools.combinations(range(4), 2)]
              for g in range(cols // 4)])]
        return sum(min(_row_error(Wd[r], Hd, set(c)) for c in choices) for r in range(rows))
    k = pattern
    best_by_count = [[min(_row_error(Wd[r], Hd, set(c)) for c in itertools.combinations(range(cols), n))
                      for n in range(cols + 1)] for r in range(rows)]
    return min(sum(best_by_count[r][n] for r, n in enumerate(counts))
               for counts in itertools.product(range(cols + 1), repeat=rows) if sum(counts) == k)


def test_brute_force_splits_the_budget_like_full_enumeration():
    W, H = problem(2, 6, 9, tokens=64)
    full = min(sum(_row_error(W[r].double(), H.double(), {j % 6 for j in pruned if j // 6 == r}) for r in range(2))
               for pruned in itertools.combinations(range(12), 7))
    assert brute_force_optimum(W, H, 7) == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_tiny_problems_against_brute_force(pattern):
    """3 x 8 weights, every mask tried. ALPS never goes below the optimum (a true lower bound), is never
    worse than SparseGPT, reaches the optimum more often and is on average far closer to it."""
    hits, excess = {"alps": 0, "sparsegpt": 0}, {"alps": 0.0, "sparsegpt": 0.0}
    for seed in range(12):
        W, H = problem(3, 8, seed, tokens=64)
        kw = dict(n=2, m=4) if pattern == "2:4" else dict(sparsity=15 / 24)
        best = brute_force_optimum(W, H, "2:4" if pattern == "2:4" else 15)
        ea = error(alps, W, H, iters=50, cg_iters=20, **kw)
        es = error(sparsegpt, W, H, **kw)
        assert ea >= best * (1 - 1e-3) and ea <= es * (1 + 1e-6)
        for name, e in (("alps", ea), ("sparsegpt", es)):
            hits[name] += e <= best * 1.02
            excess[name] += e / best - 1
    assert hits["alps"] >= 2 and hits["alps"] > hits["sparsegpt"], hits
    assert excess["alps"] < excess["sparsegpt"] / 3, excess


def test_nm_pattern_is_exact():
    W, H = problem(32, 64, 1)
    Wn, mask, loss = alps(W, H, n=2, m=4)
    groups = mask.reshape(32, -1, 4)
    assert torch.all(groups.sum(-1) == 2)
    assert torch.all(Wn[mask] == 0) and torch.all((Wn.reshape(32, -1, 4) == 0).sum(-1) >= 2)
    assert loss == pytest.approx(reconstruction_error(W, Wn, H), rel=1e-5)


def test_unstructured_budget_per_matrix_of_row_splits():
    """A matrix with 10x larger weights stacked on another: each keeps its own fraction, as SparseGPT's."""
    W, H = problem(48, 64, 2)
    W[:16] *= 10
    splits = [16, 24, 8]
    Wn, mask, _ = alps(W, H, sparsity=0.6, row_splits=splits)
    for part in mask.split(splits):
        assert int(part.sum()) == int(part.numel() * 0.6)
    assert torch.equal(mask, Wn == 0)
    with pytest.raises(ValueError, match="row_splits"):
        alps(W, H, sparsity=0.5, row_splits=[10, 10])


def test_dead_inputs_are_zero():
    W, H = problem(16, 32, 3)
    dead = torch.tensor([1, 7, 8, 30])
    H[dead, :] = 0
    H[:, dead] = 0
    for kw in (dict(sparsity=0.5), dict(n=2, m=4)):
        Wn, _, _ = alps(W, H, **kw)
        assert torch.all(torch.isfinite(Wn)) and torch.all(Wn[:, dead] == 0)
        assert reconstruction_error(W, Wn, H) <= error(sparsegpt, W, H, **kw) * (1 + 1e-6)


def test_deterministic_and_float32():
    W, H = problem(24, 64, 4)
    a = alps(W, H, sparsity=0.7)
    b = alps(W, H, sparsity=0.7)
    assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_masked_cg_matches_an_exact_solve():
    """The refit on a fixed mask: CG (enough iterations) equals solving each row's kept system."""
    W, H = problem(6, 20, 5)
    d = torch.sqrt(torch.diag(H))
    Hn = (H / d[:, None] / d[None, :]).double()
    B0 = (W * d).double()
    G = B0 @ Hn
    keep = torch.rand(6, 20, generator=torch.Generator().manual_seed(0)) > 0.5
    got = _masked_cg(Hn, G, torch.zeros_like(B0), keep, iters=40)
    for r in range(6):
        S = keep[r].nonzero().flatten()
        want = torch.linalg.solve(Hn[S][:, S], G[r, S])
        torch.testing.assert_close(got[r, S], want, rtol=1e-5, atol=1e-6)
        assert torch.all(got[r, ~keep[r]] == 0)


@pytest.mark.parametrize("n", [100, 200_000, 884_736])
def test_bracketed_kth_value_equals_kthvalue(n):
    """The sampled bracket is only a shortcut: the k-th value is torch.kthvalue's, ties and zeros included,
    and the mask holds exactly k entries."""
    g = torch.Generator().manual_seed(n)
    for case in ("plain", "half zeros", "few values"):
        x = torch.randn(n, generator=g) ** 2
        if case == "half zeros":
            x[: n // 2] = 0
        elif case == "few values":
            x = torch.round(x * 4)
        for k in (1, n // 3, int(n * 0.7), n):
            assert float(_kth_smallest(x, k)) == float(torch.kthvalue(x, k).values), (case, k)
        mask = _lowest_count(x, int(n * 0.7))
        assert int(mask.sum()) == int(n * 0.7) and x[mask].max() <= x[~mask].min()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, H = problem(32, 64, 6)
    for kw in (dict(sparsity=0.6), dict(n=2, m=4)):
        cpu = alps(W, H, **kw)
        gpu = alps(W.cuda(), H.cuda(), **kw)
        assert gpu[0].device.type == "cuda" and gpu[0].dtype == torch.float32
        assert reconstruction_error(W, gpu[0].cpu(), H) <= error(sparsegpt, W, H, **kw) * (1 + 1e-4)
        assert reconstruction_error(W, gpu[0].cpu(), H) == pytest.approx(cpu[2], rel=0.05)


def test_recipe_fields_reach_the_solver(monkeypatch):
    from sparse_export.pruning import driver
    from sparse_export.pruning.pruners import PRUNERS
    from sparse_export.pruning.recipe import Recipe

    seen = {}

    def spy(W, H, **kw):
        seen.update(kw)
        return alps(W, H, **kw)

    monkeypatch.setitem(PRUNERS, "alps", replace(PRUNERS["alps"], fn=spy))
    W, H = problem(8, 16, 7)
    r = Recipe(method="alps", sparsity=0.5, alps_iters=3, alps_rho=0.7, alps_rho_growth=1.5, alps_cg_iters=2)
    driver.prune_group(H, [W[:4], W[4:]], r)
    assert {k: seen[k] for k in ("iters", "rho", "rho_growth", "cg_iters", "row_splits")} == \
        {"iters": 3, "rho": 0.7, "rho_growth": 1.5, "cg_iters": 2, "row_splits": [4, 4]}
