"""masks.py: training with the mask fixed keeps every zero exactly zero; without it the zeros move."""

import torch

from sparse_export.recovery.masks import apply_masks, capture_masks, mask_gradients, zero_counts


def _pruned_linear(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.5] = 0
    return {"lin": lin}


def _train(mods, masked: bool, steps=20):
    torch.manual_seed(1)
    x, t = torch.randn(32, 16), torch.randn(32, 8)
    masks = capture_masks(mods)
    opt = torch.optim.AdamW(mods["lin"].parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = ((mods["lin"](x) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if masked:
            mask_gradients(mods, masks)
            assert torch.all(mods["lin"].weight.grad[~masks["lin"]] == 0)
        opt.step()
        if masked:
            apply_masks(mods, masks)
    return masks


def test_masked_training_keeps_every_zero():
    mods = _pruned_linear()
    before = zero_counts(mods)
    w0 = mods["lin"].weight.detach().clone()
    masks = _train(mods, masked=True)
    w = mods["lin"].weight.detach()
    assert zero_counts(mods) == before
    assert torch.equal(w != 0, masks["lin"])
    assert not torch.equal(w, w0)                     # the kept weights did train


def test_unmasked_training_moves_the_zeros():
    """The check above can fail: the same training without the masks fills pruned entries."""
    mods = _pruned_linear()
    before = zero_counts(mods)
    _train(mods, masked=False)
    assert zero_counts(mods)["lin"] < before["lin"]
