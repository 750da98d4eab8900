"""The integer weight grid of a --wbits model: symmetric, zero point 0 (zeros stay zero), one scale
per output row, per matrix, or (--group-size) per output row and group of input columns. Used inside the SparseGPT sweep (joint pruning + quantization), to
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
    if bits <= 4:      # float16 values: what the int4 layout stores (packed.pack4), exact
        scale = half_scale(scale)

    def quantize(col, _index):
        return torch.clamp(torch.round(col / scale), -qmax - 1, qmax) * scale

    return quantize, scale


class GroupQuantizer:
    """Group-wise grid inside the SparseGPT sweep (GPTQ's groups): one symmetric scale per (output row, group of
    `group_size` input columns), zero point 0, fixed by fix() when the sweep reaches the group's first column,
    from the group's weights as they are then (already updated by the columns before). Scales are rounded to
    float16 values (the runtime stores them as float16; q * scale stays exact in float32).

    Rounding is to nearest: pruned weights stay 0 and no pruned weight comes back, but a kept weight under
    half a step rounds to 0 too (a little more sparsity than asked). keep_nonzero=True sends such a weight to
    +-1 (its sign) instead, so the artifact's mask is exactly the pruner's; on SmolLM2 at 50%, g64, that cost
    perplexity 117.2 against 72.8 (docs/int8.md). clip_search=True picks each row's scale from CLIP_FACTORS x
    the largest |weight| of the group, the one with the least squared rounding error over the group (a clipped
    outlier against a finer step for the rest). quantize(column, index) -> the column on its group's grid."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, headroom: float | None = None,
                 keep_nonzero: bool = False, clip_search: bool = False):
        if cols % group_size:
            raise UserError(f"--group-size {group_size} does not divide the input width {cols}")
        self.bits, self.group_size, self.keep_nonzero = bits, group_size, keep_nonzero
        self.clip_search = clip_search
        self.qmax = 2 ** (bits - 1) - 1
        self.headroom = (QUANT_HEADROOM if bits == 8 else 1.0) if headroom is None else headroom
        self.scale = torch.zeros(rows, cols // group_size)
        self._fixed = [False] * (cols // group_size)

    def fix(self, index: int, W: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """Fix the scales of the group starting at column `index` from its current weights W (rows x group);
        importance: a weight per column for the clip search's error (the sweep passes 1 / [H^-1 factor]_jj^2,
        what a column's rounding error costs in the layer's output)."""
        g = index // self.group_size
        top = W.abs().amax(dim=1) * self.headroom / self.qmax
        self.scale[:, g] = clip_scales(W, top, self.qmax, importance) if self.clip_search else half_scale(top)
        self._fixed[g] = True

    def __call__(self, col: torch.Tensor, index: int) -> torch.Tensor:
        g = index // self.group_size
        if not self._fixed[g]:
            raise RuntimeError(f"group {g} quantized before its scales were fixed")
        s = self.scale[:, g]
        q = torch.clamp(torch.round(col / s), -self.qmax - 1, self.qmax)
        return (torch.where(q == 0, torch.sign(col), q) if self.keep_nonzero else q) * s


CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def clip_scales(W: torch.Tensor, top: torch.Tensor, qmax: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of W (rows x group), the float16-valued scale among CLIP_FACTORS x top with the least
    sum of squared rounding errors, each column's weighted by `importance` when given (ties: the larger scale)."""
    best, best_err = None, None
    imp = torch.ones(W.shape[1]) if importance is None else importance.float()
    for f in CLIP_FACTORS:
        s = half_scale(top * f)
        err = (((torch.clamp(torch.round(W / s[:, None]), -qmax - 1, qmax) * s[:, None] - W) ** 2) * imp).sum(dim=1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def check_group_widths(model, names, group_size: int | None) -> None:
    """UserError, before any pruning, when --group-size does not divide a matrix's input width."""
    if not group_size:
        return
    for name in sorted(names):
        cols = models.weight_2d(model.get_submodule(name)).shape[1]
        if cols % group_size:
            raise UserError(f"--group-size {group_size} does not divide the input width {cols} of {name}")


def half_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales rounded to float16 values (at least 2**-24, float16's smallest), returned as float32."""
    return scale.clamp_min(2.0 ** -24).half().float().clamp_min(2.0 ** -24)


def grid_info(bits: int, per_channel: bool, method: str, group_size: int | None = None) -> dict:
    """What sparse_export.json records about the weight grid."""
    info = {"bits": bits, "symmetric": True, "zero_point": 0, "qmin": -2 ** (bits - 1),
            "qmax": 2 ** (bits - 1) - 1, "granularity": "per-channel" if per_channel else "per-tensor",
            "scale_key": "matrices[name].scale (one value per output row)", "method": method}
    if group_size:
        info.update(granularity="per-group", group_size=group_size, scale_dtype="float16 values",
                    scale_key="matrices[name].scale (out x in/group_size: row r, columns [g*group_size, "
                              "(g+1)*group_size) share scale[r][g])")
    return info


def round_weights(model, bits: int = 8, per_channel: bool = True, names=None, group_size: int | None = None) -> dict:
    """Round every prunable matrix onto a symmetric grid (scales from the weights as they are now): per row
    or per tensor, or with group_size one float16-valued scale per (row, group of columns) as GroupQuantizer.

    Zeros stay zero. Returns {name: scale per output row (list), or out x groups (list of lists)}.
    """
    names = names if names is not None else models.prunable_names(model)
    check_group_widths(model, names, group_size)
    scales = {}
    with torch.no_grad():
        for name in names:
            mod = model.get_submodule(name)
            W = models.weight_2d(mod).float()
            if group_size:
                qmax = 2 ** (bits - 1) - 1
                scale = half_scale(W.reshape(W.shape[0], -1, group_size).abs().amax(dim=2) / qmax)
                full = expand_scale(scale, W.shape[1])
                models.set_weight_2d(mod, torch.clamp(torch.round(W / full), -qmax - 1, qmax) * full)
            else:
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
    """W (out x in) as integers on the grid given by `scale`: per row ([out]), or per row and group of columns
    ([out, groups], groups dividing in); checks it is on the grid."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    scale = expand_scale(scale, W.shape[1]) if scale.ndim == 2 else scale.reshape(-1, 1)
    x = W.float() / scale
    q = torch.round(x)
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    if float((x - q).abs().max()) > tol or q.min() < lo or q.max() > hi:
        raise UserError(f"{name} are not on their recorded {bits}-bit grid "
                        f"(max distance {float((x - q).abs().max()):.3g} steps)")
    return q.to(torch.int8)


def expand_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """Group scales [out, groups] -> one per weight [out, cols]."""
    if cols % scale.shape[1]:
        raise UserError(f"{scale.shape[1]} scale groups do not divide {cols} input columns")
    return scale.repeat_interleave(cols // scale.shape[1], dim=1)


def recorded_bits(meta: dict) -> int | None:
    """The --wbits of a pruned folder's grid (None without one)."""
    return (meta.get("recipe") or {}).get("wbits")


def recorded_group_size(meta: dict) -> int | None:
    """The --group-size of a pruned folder's grid (None: per-row or per-tensor scales)."""
    return (meta.get("recipe") or {}).get("group_size") if recorded_bits(meta) else None


def check_int8_grid(meta: dict, what: str = "the ONNX --int8 export") -> None:
    """UserError for a folder whose recorded grid an int8 matmul with one scale per row cannot hold: a 4-bit
    (or coarser) grid, or group-wise scales."""
    bits, group = recorded_bits(meta), recorded_group_size(meta)
    if bits and (bits <= 4 or group):
        grid = f"{bits}-bit" + (f" group-wise (--group-size {group})" if group else "")
        raise UserError(f"this folder holds a {grid} grid, which {what} cannot run (int8, one scale per row); "
                        "run it on sparse-cpu, or prune with --wbits 8 and no --group-size")


def recorded_scales(meta: dict, names) -> dict:
    """{name: scale list} from a pruned folder's sparse_export.json; {} when it has no int grid."""
    wbits = (meta.get("recipe") or {}).get("wbits")
    if not wbits or wbits > 8:
        return {}
    mats = meta.get("matrices") or {}
    return {n: mats[n]["scale"] for n in names if "scale" in mats.get(n, {})}
