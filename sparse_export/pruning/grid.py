"""The integer weight grid of a --wbits model: symmetric, zero point 0 (zeros stay zero), one scale
per output row or per matrix. Used inside the SparseGPT sweep (joint pruning + quantization), to
round a pruned model afterwards ("prune then round", the baseline joint pruning should beat), and by
the INT8 export to read the integer values back exactly.
"""

from collections.abc import Callable

import torch

from .. import models
from ..errors import UserError

# At 8 bits the joint grid spans QUANT_HEADROOM x the largest |weight| before the sweep: SparseGPT's
# updates grow the rows they compensate (SmolLM2-135M at 50%: row maxima +0.8% median, +7% at the 90th
# and +17% at the 99th percentile), and weights clipped at the grid's end cost joint int8 pruning 1.6%
# perplexity (50.49 vs 49.70 fp32; with 1.1: 49.73, with 1.2: 49.78). Coarser grids keep 1.0: there a
# 10% larger step costs more than the clipping it avoids (tests/pruning/test_grid.py).
QUANT_HEADROOM = 1.1


def make_quantizer(W: torch.Tensor, bits: int, per_channel: bool, row_splits: list[int] | None = None,
                   headroom: float | None = None) -> tuple[Callable, torch.Tensor]:
    """Symmetric grid (zero point 0, so zeros stay zero); scales fixed before the sweep.

    Per tensor means one scale per matrix: matrices stacked into one sweep (row_splits) keep their own.
    headroom: the grid spans this times the largest |weight| (default: QUANT_HEADROOM at 8 bits, else 1).
    Returns (quantize(column, index) -> column on the grid, scale per row).
    """
    if headroom is None:
        headroom = QUANT_HEADROOM if bits == 8 else 1.0
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        scale = W.abs().amax(dim=1).clamp_min(1e-12) * headroom / qmax
    else:
        scale = torch.cat([part.abs().max().clamp_min(1e-12).expand(part.shape[0])
                           for part in W.split(row_splits or [W.shape[0]])]) * headroom / qmax

    def quantize(col, _index):
        return torch.clamp(torch.round(col / scale), -qmax - 1, qmax) * scale

    return quantize, scale


def grid_info(bits: int, per_channel: bool, method: str) -> dict:
    """What sparse_export.json records about the weight grid."""
    return {"bits": bits, "symmetric": True, "zero_point": 0, "qmin": -2 ** (bits - 1),
            "qmax": 2 ** (bits - 1) - 1, "granularity": "per-channel" if per_channel else "per-tensor",
            "scale_key": "matrices[name].scale (one value per output row)", "method": method}


def round_weights(model, bits: int = 8, per_channel: bool = True, names=None) -> dict:
    """Round every prunable matrix onto a symmetric grid (scales from the weights as they are now).

    Zeros stay zero. Returns {name: scale per output row (list)}.
    """
    names = names if names is not None else models.prunable_names(model)
    scales = {}
    with torch.no_grad():
        for name in names:
            mod = model.get_submodule(name)
            W = models.weight_2d(mod).float()
            quantize, scale = make_quantizer(W, bits, per_channel, headroom=1.0)  # no updates follow
            models.set_weight_2d(mod, quantize(W.t(), None).t())   # the quantizer takes columns
            scales[name] = scale.tolist()
    return scales


def grid_tolerance(stored: torch.dtype) -> float:
    """How far (in steps) weights stored in `stored` may sit from their grid and still be read back.

    float32 holds grid values exactly. A 16-bit store moves q * scale by at most half its last place:
    float16 (11-bit significand) under 127 / 2**12 = 0.03 steps, bfloat16 (8 bits) under 127 / 2**8 = 0.496
    steps: still the nearest integer, so rounding reads the grid back, but nothing finer can be checked."""
    if stored == torch.float32:
        return 1e-3
    return 0.5 if stored == torch.bfloat16 else 0.3


def int_weight(W: torch.Tensor, scale, bits: int = 8, tol: float = 1e-3, name: str = "weights") -> torch.Tensor:
    """W (out x in) as integers on the grid given by `scale` (per row); checks it is on the grid."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
    x = W.float() / scale
    q = torch.round(x)
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    if float((x - q).abs().max()) > tol or q.min() < lo or q.max() > hi:
        raise UserError(f"{name} are not on their recorded {bits}-bit grid "
                        f"(max distance {float((x - q).abs().max()):.3g} steps)")
    return q.to(torch.int8)


def recorded_scales(meta: dict, names) -> dict:
    """{name: scale list} from a pruned folder's sparse_export.json; {} when it has no int grid."""
    wbits = (meta.get("recipe") or {}).get("wbits")
    if not wbits or wbits > 8:
        return {}
    mats = meta.get("matrices") or {}
    return {n: mats[n]["scale"] for n in names if "scale" in mats.get(n, {})}
