"""Training with the mask fixed: every weight that is zero after pruning stays exactly zero.

    masks = capture_masks(mods)        # {name: weight != 0}, once, right after pruning
    loss.backward()
    mask_gradients(mods, masks)        # the gradient of a pruned entry is zero ...
    optimizer.step()
    apply_masks(mods, masks)           # ... and the entry is set back to zero after every step

`mods` is {name: module with a .weight} (the prunable Linear / Conv1D modules). The masks are on the
parameter as stored (a GPT-2 Conv1D keeps its weight transposed: the mask is too). zero_counts() is
what the tests compare before and after.

For a model pruned onto an integer grid (--wbits), `on_grid(mods, masks, scales, bits)` trains through
the grid with the scales fixed: the forward sees each weight rounded onto the recorded grid (kept weights
never round to zero), the gradient passes straight through to a latent fp32 copy, and on leaving the
weights written are the rounded ones.

Whole-model training (distill.py) attaches the same parametrization for the whole run instead:
fix_masks(model, zero_masks(model, names), grid_scales(meta, model, names), bits), then bake() at the end.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..pruning.grid import expand_scale, recorded_scales


def capture_masks(mods: dict) -> dict[str, torch.Tensor]:
    """{name: bool tensor, True where the weight is kept (non-zero)}."""
    return {name: (mod.weight.detach() != 0) for name, mod in mods.items()}


def trained_weight(mod) -> torch.nn.Parameter:
    """The parameter an optimizer trains: the weight, or its latent copy inside on_grid()."""
    if parametrize.is_parametrized(mod, "weight"):
        return mod.parametrizations.weight.original
    return mod.weight


def mask_gradients(mods: dict, masks: dict) -> None:
    """Zero the gradient of every pruned entry (in place; modules without a gradient are skipped)."""
    for name, mod in mods.items():
        g = trained_weight(mod).grad
        if g is not None:
            g.masked_fill_(~masks[name].to(g.device), 0)


@torch.no_grad()
def apply_masks(mods: dict, masks: dict) -> None:
    """Set every pruned entry back to exactly +0.0 (after each optimizer step)."""
    for name, mod in mods.items():
        w = trained_weight(mod)
        w.masked_fill_(~masks[name].to(w.device), 0)


def stored_scale(scale, mod) -> torch.Tensor:
    """A recorded grid scale (per output row [out], or per row and group of columns [out, groups]) shaped to
    broadcast against the weight as `mod` stores it (a GPT-2 Conv1D keeps it transposed: in x out)."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    conv1d = type(mod).__name__ == "Conv1D"
    if s.ndim == 2:
        full = expand_scale(s, mod.weight.shape[0 if conv1d else 1])
        return full.t().contiguous() if conv1d else full
    return s.reshape(1, -1) if conv1d else s.reshape(-1, 1)


class MaskedGrid(nn.Module):
    """Parametrization: weight -> mask * weight, then (with a scale) rounded onto the grid with a
    straight-through gradient; a kept weight stays off zero (at +-1 step), so the zero count is the mask's."""

    def __init__(self, mask: torch.Tensor, scale: torch.Tensor | None, bits: int | None):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.qmax = 2 ** (bits - 1) - 1 if bits else 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        if self.scale is None:
            return w
        s = self.scale.to(w.dtype)
        x = w / s
        q = torch.clamp(x + (torch.round(x) - x).detach(), -self.qmax - 1, self.qmax)
        q = q + ((torch.where(w >= 0, 1.0, -1.0) - q) * ((q == 0) & (self.mask != 0))).detach()
        return q * s


@contextlib.contextmanager
def on_grid(mods: dict, masks: dict, scales: dict, bits: int) -> Iterator[None]:
    """Inside: each module's weight is rounded onto its grid in the forward (scales: {name: recorded scale,
    per row or per row and group}); trained_weight() is the latent copy. On leaving, the rounded weights stay."""
    done = []
    try:
        for name, mod in mods.items():
            w = mod.weight
            scale = stored_scale(scales[name], mod).to(w.device)
            parametrize.register_parametrization(mod, "weight", MaskedGrid(masks[name].to(w), scale, bits),
                                                 unsafe=True)
            done.append(mod)
        yield
    finally:
        for mod in done:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def zero_counts(mods: dict) -> dict[str, int]:
    """{name: number of zero weights}."""
    return {name: int((mod.weight.detach() == 0).sum()) for name, mod in mods.items()}


def zero_masks(model, names) -> dict:
    """{name: float mask (1 kept, 0 pruned)} of each matrix of `model`, in the stored weight's layout."""
    return {n: (model.get_submodule(n).weight.detach() != 0).float() for n in names}


def grid_scales(meta: dict, model, names) -> dict:
    """{name: recorded scale shaped like the stored weight's broadcast} of a pruned folder with an integer grid
    (per row or per group); {} without one. The one place distillation reads the recorded scales."""
    return {name: stored_scale(scale, model.get_submodule(name))
            for name, scale in recorded_scales(meta, names).items()}


def fix_masks(model, masks: dict, scales: dict, bits: int | None) -> None:
    """Attach MaskedGrid to each matrix in `masks` for the whole run (scales: from grid_scales)."""
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        parametrize.register_parametrization(mod, "weight", MaskedGrid(mask, scales.get(name), bits), unsafe=True)


def bake(model, names) -> None:
    """Remove the parametrizations, leaving the masked (and rounded) weights in place."""
    for name in names:
        mod = model.get_submodule(name)
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
