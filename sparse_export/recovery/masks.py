"""Training with the mask fixed: every weight that is zero after pruning stays exactly zero.

    masks = capture_masks(mods)        # {name: weight != 0}, once, right after pruning
    loss.backward()
    mask_gradients(mods, masks)        # the gradient of a pruned entry is zero ...
    optimizer.step()
    apply_masks(mods, masks)           # ... and the entry is set back to zero after every step

`mods` is {name: module with a .weight} (the prunable Linear / Conv1D modules). The masks are on the
parameter as stored (a GPT-2 Conv1D keeps its weight transposed: the mask is too). zero_counts() is
what the tests compare before and after.
"""

import torch


def capture_masks(mods: dict) -> dict[str, torch.Tensor]:
    """{name: bool tensor, True where the weight is kept (non-zero)}."""
    return {name: (mod.weight.detach() != 0) for name, mod in mods.items()}


def mask_gradients(mods: dict, masks: dict) -> None:
    """Zero the gradient of every pruned entry (in place; modules without a gradient are skipped)."""
    for name, mod in mods.items():
        g = mod.weight.grad
        if g is not None:
            g.masked_fill_(~masks[name].to(g.device), 0)


@torch.no_grad()
def apply_masks(mods: dict, masks: dict) -> None:
    """Set every pruned entry back to exactly +0.0 (after each optimizer step)."""
    for name, mod in mods.items():
        mod.weight.masked_fill_(~masks[name].to(mod.weight.device), 0)


def zero_counts(mods: dict) -> dict[str, int]:
    """{name: number of zero weights}."""
    return {name: int((mod.weight.detach() == 0).sum()) for name, mod in mods.items()}
