"""Keeping a pruned model's zeros while it trains, and training through its weight grid.

Each prunable matrix gets a torch parametrization: the weight the model uses is mask * W (every zero of the
pruned model stays exactly zero, and its gradient is zero), and with a recorded --wbits grid
round(W / scale) * scale with a straight-through gradient (the scales stay fixed)."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import models
from ..pruning.grid import recorded_scales


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class MaskedGrid(nn.Module):
    """weight -> mask * weight, then onto the grid when a scale is given (scale shaped to broadcast)."""

    def __init__(self, mask: torch.Tensor, scale: torch.Tensor | None, bits: int | None):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.qmax = 2 ** (bits - 1) - 1 if bits else 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        if self.scale is None:
            return w
        q = torch.clamp(_ste_round(w / self.scale), -self.qmax - 1, self.qmax)
        # a kept weight stays off zero (at +-1 step), so the zero count is the mask's exactly
        q = q + ((torch.where(w >= 0, 1.0, -1.0) - q) * ((q == 0) & (self.mask != 0))).detach()
        return q * self.scale


def grid_scales(meta: dict, model, names) -> dict:
    """{name: scale tensor shaped like the stored weight's broadcast (per output row)} of a pruned folder with
    an integer grid; {} without one. The one place that reads the recorded scales (a per-group grid changes
    only this)."""
    out = {}
    for name, scale in recorded_scales(meta, names).items():
        mod = model.get_submodule(name)
        s = torch.as_tensor(scale, dtype=torch.float32)
        out[name] = s.reshape(1, -1) if type(mod).__name__ == "Conv1D" else s.reshape(-1, 1)
    return out


def zero_masks(model, names) -> dict:
    """{name: float mask (1 kept, 0 pruned)} in the stored weight's layout."""
    return {n: (model.get_submodule(n).weight.detach() != 0).float() for n in names}


def fix_masks(model, masks: dict, scales: dict, bits: int | None) -> None:
    """Attach MaskedGrid to each matrix in `masks` (scales: from grid_scales)."""
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        parametrize.register_parametrization(mod, "weight", MaskedGrid(mask, scales.get(name), bits),
                                             unsafe=True)


def bake(model, names) -> None:
    """Remove the parametrizations, leaving the masked (and rounded) weights in place."""
    for name in names:
        mod = model.get_submodule(name)
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def zero_counts(model, names) -> dict:
    """{name: number of exact zeros} of each matrix as the model uses it."""
    return {n: int((models.weight_2d(model.get_submodule(n)) == 0).sum()) for n in names}
