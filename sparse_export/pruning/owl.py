"""OWL's pre-pass: each decoder layer's outlier ratio, measured on the dense model.

The calibration text runs through the dense layers once before any is pruned (as the OWL authors do):
each layer's Wanda scores |W_ij| * ||X_j|| come from its dense inputs, so the ratios, and the sparsities
allocation.owl_sparsities makes of them, do not depend on the pruner. Used by the in-memory driver and
by the streamed one (which reads each layer from its shards for this pass too).
"""

import torch

from .. import models
from ..layerwise import run_layer
from .allocation import owl_sparsities, weighted_mean


def outlier_fraction(weights: list[torch.Tensor], sq_norms: list[torch.Tensor], threshold: float) -> float:
    """Fraction of the scores |W_ij| * sqrt(sq_norms_j) of all `weights` (out x in) above `threshold` x
    their mean. Scores are made one matrix at a time (twice), never all at once."""
    def scores():
        for W, s in zip(weights, sq_norms):
            yield W.float().abs() * s.float().clamp_min(0).sqrt()[None, :]

    total, count = 0.0, 0
    for x in scores():
        total += float(x.double().sum())
        count += x.numel()
    if not count:
        return 0.0
    cut = threshold * total / count
    return sum(int((x > cut).sum()) for x in scores()) / count


@torch.no_grad()
def layer_outlier_ratio(layer, mods: dict, hidden, kwargs: list, threshold: float, device=None,
                        out=None) -> tuple[object, float, int]:
    """Run the dense `layer` over the chunks `hidden`, measuring the inputs of `mods` ({name: module}).

    Returns (its outputs: `out` when given, else a list of chunks on the host; the layer's outlier
    ratio; the number of weights in `mods`)."""
    device = device or torch.device("cpu")
    sq = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            s = (x * x).sum(0)
            sq[name] = s if name not in sq else sq[name] + s
        return fn

    layer.to(device)
    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        results = run_layer(layer, hidden, kwargs, device, out)
    finally:
        for h in handles:
            h.remove()
    names = [n for n in mods if n in sq]
    ratio = outlier_fraction([models.weight_2d(mods[n]) for n in names], [sq[n] for n in names], threshold)
    count = sum(models.weight_2d(m).numel() for m in mods.values())
    return results, ratio, count


def owl_record(recipe, ratios: list[float], counts: list[int]) -> dict:
    """The allocation as sparse_export.json records it (and state.json keeps it for --resume)."""
    sparsities = owl_sparsities(ratios, counts, recipe.sparsity, recipe.owl_lambda)
    return {"method": "owl", "threshold": recipe.owl_threshold, "lambda": recipe.owl_lambda,
            "target_sparsity": recipe.sparsity, "planned_sparsity": weighted_mean(sparsities, counts),
            "measured_on": "dense model, calibration text",
            "layers": [{"layer": i, "outlier_ratio": r, "sparsity": s, "weights": c}
                       for i, (r, s, c) in enumerate(zip(ratios, sparsities, counts))]}

