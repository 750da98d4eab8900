"""OWL's allocation arithmetic against hand-computed values and the OWL authors' formula, the outlier
ratio against a naive one, and the recipe's one-line refusals."""

import numpy as np
import pytest
import torch

from sparse_export.errors import UserError
from sparse_export.pruning.allocation import owl_sparsities, weighted_mean
from sparse_export.pruning.owl import outlier_fraction
from sparse_export.pruning.recipe import Recipe


def test_hand_computed_allocations():
    # ratios 1%, 3%, 2% -> unit positions 0, 1, 0.5 -> s + lam - 2 lam u = 0.6, 0.4, 0.5
    assert owl_sparsities([0.01, 0.03, 0.02], [100, 100, 200], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5])
    # weighted mean before the shift (60 + 120 + 50) / 500 = 0.46: every layer moves up by 0.04
    got = owl_sparsities([0.01, 0.03, 0.02], [100, 300, 100], 0.5, 0.1)
    assert got == pytest.approx([0.64, 0.44, 0.54])
    assert weighted_mean(got, [100, 300, 100]) == pytest.approx(0.5, abs=1e-12)


def test_equal_layers_follow_the_owl_authors_formula():
    """OWL's code: ratios normalized to [0, 2 lam], minus their mean, plus 1 - s (density)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = rng.random(30) * 0.05
        s, lam = rng.uniform(0.3, 0.8), rng.uniform(0.01, 0.1)
        density = (r - r.min()) / (r.max() - r.min()) * 2 * lam
        density = density - density.mean() + (1 - s)
        assert owl_sparsities(list(r), [7] * 30, s, lam) == pytest.approx(list(1 - density), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_average_is_exact_and_span_is_two_lambda(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    ratios, counts = list(rng.random(n) * 0.1), list(rng.integers(1, 10_000, n))
    s, lam = 0.6, 0.08
    got = owl_sparsities(ratios, counts, s, lam)
    assert weighted_mean(got, counts) == pytest.approx(s, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert all(s - 2 * lam <= x <= s + 2 * lam for x in got)
    # more outliers, lower sparsity: the order of the ratios reversed
    order = np.argsort(ratios)
    assert all(got[a] >= got[b] - 1e-12 for a, b in zip(order, order[1:]))


def test_layers_without_weights_and_equal_ratios():
    assert owl_sparsities([0.5, 0.01, 0.03], [0, 10, 10], 0.5, 0.1) == pytest.approx([0.5, 0.6, 0.4])
    assert owl_sparsities([0.02, 0.02], [3, 5], 0.7, 0.1) == pytest.approx([0.7, 0.7])


def test_lambda_that_leaves_zero_one_is_refused():
    with pytest.raises(UserError, match="owl-lambda.*layer 1"):
        owl_sparsities([0.0, 1.0], [1, 1], 0.1, 0.2)          # 0.3 and -0.1
    with pytest.raises(UserError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], [1, 1], 0.95, 0.1)          # 1.05 and 0.85
    with pytest.raises(UserError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], [1, 1], 0.5, 0.0)


def test_outlier_fraction_matches_a_naive_count():
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(6, 32, generator=g)]
    Ws[0][0, 3] = 40.0
    sq = [torch.rand(16, generator=g) * 5, torch.rand(16, generator=g), torch.rand(32, generator=g) * 100]
    flat = torch.cat([(W.abs() * s.sqrt()).flatten() for W, s in zip(Ws, sq)]).double()
    for M in (1.0, 2.0, 5.0):
        want = float((flat > M * flat.mean()).double().mean())
        assert outlier_fraction(Ws, sq, M) == pytest.approx(want)
    assert outlier_fraction(Ws, sq, 5.0) > 0


@pytest.mark.parametrize("kw,expect", [
    (dict(allocation="owl", pattern="2:4"), "pattern"),
    (dict(allocation="owl", method="magnitude"), "activations"),
    (dict(allocation="owl", owl_lambda=0.0), "owl-lambda"),
    (dict(allocation="owl", owl_lambda=0.6), "owl-lambda"),
    (dict(allocation="owl", owl_threshold=-1.0), "owl-threshold"),
    (dict(allocation="layerwise"), "allocation"),
    (dict(method="alps", alps_iters=0), "alps-iters"),
    (dict(method="alps", alps_cg_iters=-2), "alps-cg-iters"),
    (dict(method="alps", alps_rho=0.0), "alps-rho"),
    (dict(method="alps", alps_rho_growth=0.5), "alps-rho-growth"),
    (dict(method="wanda", wbits=8), "wbits"),
])
def test_recipe_refusals(kw, expect):
    with pytest.raises(UserError, match=expect):
        Recipe(**kw).validate()


def test_valid_recipes_pass():
    Recipe(allocation="owl", sparsity=0.7).validate()
    Recipe(method="alps", pattern="2:4").validate()
    Recipe(method="alps", allocation="owl", sparsity=0.6, owl_lambda=0.05).validate()
