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
"""

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.utils import parametrize


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


class _OnGrid(torch.nn.Module):
    """Parametrization: the weight rounded onto its grid (scale per output row), gradient straight through."""

    def __init__(self, scale: torch.Tensor, bits: int, mask: torch.Tensor, transposed: bool):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("scale", scale.reshape(1, -1) if transposed else scale.reshape(-1, 1))
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale.to(w.dtype)
        q = torch.clamp(torch.round(w / s), -self.qmax - 1, self.qmax)
        one = torch.where(w < 0, -1.0, 1.0).to(q.dtype)
        q = torch.where(self.mask & (q == 0), one, q) * self.mask   # kept stays non-zero, pruned stays zero
        return w + (q * s - w).detach()


@contextlib.contextmanager
def on_grid(mods: dict, masks: dict, scales: dict, bits: int) -> Iterator[None]:
    """Inside: each module's weight is rounded onto its grid in the forward (scales: {name: per-row scale of
    the out x in weight}); trained_weight() is the latent copy. On leaving, the rounded weights stay."""
    done = []
    try:
        for name, mod in mods.items():
            w = mod.weight
            scale = torch.as_tensor(scales[name], dtype=torch.float32, device=w.device)
            parametrize.register_parametrization(mod, "weight", _OnGrid(scale, bits, masks[name].to(w.device),
                                                                        type(mod).__name__ == "Conv1D"))
            done.append(mod)
        yield
    finally:
        for mod in done:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def zero_counts(mods: dict) -> dict[str, int]:
    """{name: number of zero weights}."""
    return {name: int((mod.weight.detach() == 0).sum()) for name, mod in mods.items()}
