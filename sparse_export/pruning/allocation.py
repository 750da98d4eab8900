"""Per-layer sparsity: OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"), pure arithmetic.

A decoder layer's outlier ratio (owl.py measures it) is the fraction of its Wanda scores
|W_ij| * ||X_j|| (all its pruned matrices together) above M times their mean. Ratios map linearly
onto [s + lam, s - lam] (most outliers: lowest sparsity), then every layer is shifted by one constant so that the average over all pruned
weights, each layer weighted by its weight count, is exactly s. With equal layers this is OWL's own
formula (normalize to [0, 2 lam], centre on the mean).
"""

from ..errors import UserError


def owl_sparsities(ratios: list[float], counts: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios; sum(count * s_l) / sum(count) == sparsity.

    Layers with count 0 (nothing pruned there) get `sparsity` and take no part. UserError when a layer
    would leave [0, 1): --owl-lambda too large for this sparsity.
    """
    if len(ratios) != len(counts):
        raise ValueError(f"{len(ratios)} ratios for {len(counts)} layers")
    if lam <= 0:
        raise UserError(f"--owl-lambda must be > 0, got {lam} (for equal sparsities use --allocation uniform)")
    live = [i for i, c in enumerate(counts) if c > 0]
    out = [float(sparsity)] * len(ratios)
    if not live:
        return out
    lo, hi = min(ratios[i] for i in live), max(ratios[i] for i in live)
    for i in live:
        unit = (ratios[i] - lo) / (hi - lo) if hi > lo else 0.5
        out[i] = sparsity + lam - 2 * lam * unit
    total = sum(counts[i] for i in live)
    shift = sparsity - sum(out[i] * counts[i] for i in live) / total
    for i in live:
        out[i] += shift
    worst = min(live, key=lambda i: min(out[i], 1 - out[i]))
    if not 0 <= out[worst] < 1:
        raise UserError(f"--owl-lambda {lam} puts layer {worst} at sparsity {out[worst]:.3f} (must stay in "
                        f"[0, 1) around --sparsity {sparsity}); lower --owl-lambda")
    return out


def weighted_mean(values: list[float], counts: list[int]) -> float:
    """sum(count * value) / sum(count): the sparsity of all pruned weights together."""
    total = sum(counts)
    return sum(v * c for v, c in zip(values, counts)) / total if total else 0.0
