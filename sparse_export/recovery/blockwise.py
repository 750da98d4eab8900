"""Block-wise reconstruction (`--recover blockwise`): right after a decoder layer is pruned, its kept
weights are trained so the pruned layer reproduces the dense layer's outputs.

Runs inside the layer-by-layer driver (pruning/driver.py prune_model, pruning/stream.py stream_prune)
as its `after_layer` hook, so pruning/ never imports this module:

    before(i, layer, hidden, kwargs, device)        the layer is still dense: its target outputs
    after(i, layer, mods, hidden, kwargs, device, pruned_out, out) -> (outputs, record)

Inputs are the hidden states from the layers before, already pruned and recovered. The target is
  dense-chain (default): the dense model's own hidden states after layer i. A second chain of hidden
      states goes through the dense layers beside the pruned one (EBFT-style), so each recovered layer
      is pulled back towards the dense model and errors do not compound;
  local: the dense layer i applied to the pruned chain's inputs (what SparseGPT itself minimises;
      no second chain, half the hidden-state memory).
Trained: the weights and biases of the layer's pruned Linear modules; norms and everything else stay
fixed. Adam, fp32, MSE normalised by the target's mean square, mini-batches of --recover-batch
samples in a seeded order. The masks (masks.py) keep every pruned weight exactly zero. A layer whose
error does not fall keeps its pruned weights. A --wbits prune trains through its recorded grid (fixed
scales, straight-through rounding, masks.on_grid): the weights written are on the grid.
"""

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..layerwise import layer_out, run_layer, to_device
from .masks import apply_masks, capture_masks, mask_gradients, on_grid, trained_weight

RECOVER_TARGETS = ("dense-chain", "local")
METHODS = ("blockwise",)


@dataclass
class BlockwiseOptions:
    """What decides a block-wise recovery."""

    epochs: int = 2
    lr: float = 3e-4
    batch: int = 2                 # calibration samples per step
    target: str = "dense-chain"
    seed: int = 0

    def validate(self) -> "BlockwiseOptions":
        if self.epochs < 1:
            raise UserError(f"--recover-epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0 or self.lr != self.lr or self.lr == float("inf"):
            raise UserError(f"--recover-lr must be a positive number, got {self.lr}")
        if self.batch < 1:
            raise UserError(f"--recover-batch must be >= 1, got {self.batch}")
        if self.target not in RECOVER_TARGETS:
            raise UserError(f"unknown --recover-target '{self.target}' (choose from {', '.join(RECOVER_TARGETS)})")
        return self

    def to_dict(self) -> dict:
        return {"method": "blockwise", **asdict(self)}


def check_recipe(recipe) -> None:
    """What a prune recipe must allow for block-wise recovery (one-line UserErrors)."""
    if not recipe.pruner.needs_calibration:
        raise UserError(f"--recover blockwise trains on calibration text; --method {recipe.method} runs none")


def slice_kwargs(kw, s: int, e: int, n: int) -> object:
    """The keyword arguments of a chunk of n samples cut to samples s:e: tensors of 2+ dimensions whose
    first dimension is n (or a multiple of n, batch-major: BLOOM's alibi is [n * heads, ...]) are cut;
    the rest (broadcast tensors, cache positions) pass as they are."""
    if isinstance(kw, torch.Tensor):
        d = kw.shape[0] if kw.dim() >= 2 else 0
        if n > 1 and d >= n and d % n == 0:
            k = d // n
            return kw.reshape((n, k) + tuple(kw.shape[1:]))[s:e].reshape(((e - s) * k,) + tuple(kw.shape[1:]))
        return kw
    if isinstance(kw, (tuple, list)):
        return type(kw)(slice_kwargs(x, s, e, n) for x in kw)
    if isinstance(kw, dict):
        return {k: slice_kwargs(v, s, e, n) for k, v in kw.items()}
    return kw


def _rel_error(outputs, targets, count: int) -> float:
    """sum (y - t)^2 / sum t^2 over the chunks."""
    num = den = 0.0
    for j in range(count):
        y, t = outputs[j].double(), targets[j].double()
        num += float(((y - t) ** 2).sum())
        den += float((t ** 2).sum())
    return num / max(den, 1e-30)


class BlockwiseRecovery:
    """The driver's after_layer hook for block-wise reconstruction (see the module docstring).

    Hidden states are indexed by chunk like the driver's (a list, or a layerwise.Activations store).
    begin() gives it two stores of the driver's shape (the dense chain's inputs and outputs; lists when
    None); checkpoint() saves the dense chain with a streamed prune's resume state, begin(saved=...) reads
    it back. With the local target only the second store is used (the targets)."""

    def __init__(self, options: BlockwiseOptions, bits: int | None = None):
        self.options = options.validate()
        self.bits = bits             # --wbits: train through the recorded grid (masks.on_grid)
        self.src = self.dst = None
        self._target_cpu = 0.0       # CPU s of the last before(): the dense targets, counted in after()

    def record(self) -> dict:
        """The options that decide the result (also part of a streamed run's fingerprint)."""
        return {**self.options.to_dict(), **({"on_grid_bits": self.bits} if self.bits else {})}

    def meta(self, recipe, calib, layer_log: list) -> dict:
        """The `recovery` key of sparse_export.json: the recipe, the data (the calibration windows) and
        each layer's relative error before and after."""
        return _meta(self, recipe, calib, layer_log)

    # -- the dense chain
    def begin(self, hidden, stores: tuple | None = None, saved: dict | None = None) -> None:
        """hidden: the first layer's inputs (copied as the dense chain's start unless `saved` is given).
        stores: (src, dst) Activations stores; None: lists. saved: what checkpoint() returned."""
        count = len(hidden)
        if stores is None:
            self.src, self.dst = [None] * count, [None] * count
        else:
            self.src, self.dst = stores
        if self.options.target != "dense-chain":
            return
        if saved and saved.get("dense"):
            path = Path(saved["dense"])
            if getattr(self.src, "path", None) is not None:
                if path == self.dst.path:
                    self.src, self.dst = self.dst, self.src
            else:
                self.src.load(path)
            return
        for j in range(count):
            self.src[j] = hidden[j].clone() if stores is None else hidden[j]

    def checkpoint(self, work: Path, i: int) -> dict:
        """After layer i (streamed): where the dense chain's hidden states are, for --resume."""
        if self.options.target != "dense-chain":
            return {}
        if getattr(self.src, "path", None) is not None:
            return {"dense": str(self.src.path)}
        saved = Path(work) / f"dense-{i % 2}.bin"
        self.src.save(saved)
        return {"dense": str(saved)}

    # -- one layer
    @torch.no_grad()
    def before(self, i: int, layer, hidden, kwargs: list, device) -> None:
        """Layer i, still dense: its target outputs into self.dst."""
        c0 = time.process_time()
        layer.to(device)
        inputs = self.src if self.options.target == "dense-chain" else hidden
        for j, kw in enumerate(kwargs):
            self.dst[j] = layer_out(layer(to_device(inputs[j], device), **to_device(kw, device))).to("cpu")
        self._target_cpu = time.process_time() - c0

    def after(self, i: int, layer, mods: dict, hidden, kwargs: list, device, pruned_out, out=None,
              stats: dict | None = None) -> tuple[object, dict]:
        """Train layer i (pruned) towards its targets; returns (its outputs: `out` when given, else a list,
        and the record {before, after, kept, steps, seconds, cpu_seconds}: wall time of the training, and the
        process's CPU time of the training and of the dense targets). stats: the prune's per-matrix stats (the
        grid scales of a --wbits prune)."""
        t0, c0 = time.perf_counter(), time.process_time()
        targets = self.dst
        before = _rel_error(pruned_out, targets, len(kwargs))
        snapshot = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                    for n, m in mods.items()}
        scales = {n: stats[n]["scale"] for n in mods} if self.bits else None
        steps = self._train(i, layer, mods, hidden, kwargs, targets, device, scales)
        outputs = _run(layer, hidden, kwargs, device, out)
        after = _rel_error(outputs, targets, len(kwargs))
        kept = "recovered"
        if not after < before:                        # no better: the pruned weights stay
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(snapshot[n][0])
                    if m.bias is not None:
                        m.bias.copy_(snapshot[n][1])
            outputs = _run(layer, hidden, kwargs, device, out)
            after, kept = before, "pruned"
        if self.options.target == "dense-chain":
            self.src, self.dst = self.dst, self.src    # the dense outputs are the next layer's dense inputs
        return outputs, {"before": before, "after": after, "kept": kept, "steps": steps,
                         "seconds": time.perf_counter() - t0,
                         "cpu_seconds": time.process_time() - c0 + self._target_cpu}

    def _train(self, i, layer, mods, hidden, kwargs, targets, device, scales=None) -> int:
        layer.to(device)
        dtype = next(layer.parameters()).dtype
        layer.float()
        masks = capture_masks(mods)
        grid = on_grid(mods, masks, scales, self.bits) if scales else contextlib.nullcontext()
        try:
            with grid:
                return self._steps(i, layer, mods, masks, hidden, kwargs, targets, device)
        finally:
            layer.to(dtype)

    def _steps(self, i, layer, mods, masks, hidden, kwargs, targets, device) -> int:
        o = self.options
        params = [p for m in mods.values() for p in (trained_weight(m), m.bias) if p is not None]
        ids = {id(p) for p in params}
        frozen = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in frozen:
            p.requires_grad_(id(p) in ids)
        opt = torch.optim.Adam(params, lr=o.lr)
        gen = torch.Generator().manual_seed(o.seed * 100003 + i)
        done = 0
        try:
            with torch.enable_grad():
                for _ in range(o.epochs):
                    # chunks in a random order, each read once per epoch; its mini-batches in a random order
                    for j in torch.randperm(len(kwargs), generator=gen).tolist():
                        x_all = hidden[j].to(device, torch.float32)
                        t_all = targets[j].to(device, torch.float32)
                        n = x_all.shape[0]
                        spans = [(s, min(s + o.batch, n)) for s in range(0, n, o.batch)]
                        for k in torch.randperm(len(spans), generator=gen).tolist():
                            s, e = spans[k]
                            x, t = x_all[s:e], t_all[s:e]
                            kw = to_device(slice_kwargs(kwargs[j], s, e, n), device)
                            y = layer_out(layer(x, **kw))
                            loss = ((y - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-30)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            mask_gradients(mods, masks)
                            opt.step()
                            apply_masks(mods, masks)
                            done += 1
                        del x_all, t_all
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            for p in params:
                p.grad = None
        return done


@torch.no_grad()
def _run(layer, hidden, kwargs, device, out=None):
    return run_layer(layer, hidden, kwargs, device, out)


def _meta(hook: "BlockwiseRecovery", recipe, calib, layer_log: list) -> dict:
    layers = [{"layer": x["layer"], **x["recovery"]} for x in layer_log if "recovery" in x]
    return {**hook.record(), "data": str(recipe.calib), "nsamples": int(calib.shape[0]),
            "seqlen": int(calib.shape[1]), "tokens": int(calib.numel()),
            "trained": "weights and biases of the pruned Linear modules (norms fixed)",
            "mean_error_before": sum(x["before"] for x in layers) / max(len(layers), 1),
            "mean_error_after": sum(x["after"] for x in layers) / max(len(layers), 1),
            "cpu_seconds": sum(x.get("cpu_seconds", 0.0) for x in layers), "layers": layers}


def make_hook(recover: str | None, recipe, epochs: int | None = None, lr: float | None = None,
              batch: int | None = None, target: str | None = None) -> BlockwiseRecovery | None:
    """The after_layer hook for `--recover` (None: no recovery) from the options the user set (None: not set);
    one-line UserErrors for bad values, options without --recover, and recipes it cannot follow."""
    given = {k: v for k, v in dict(epochs=epochs, lr=lr, batch=batch, target=target).items() if v is not None}
    if recover in (None, "none"):
        if given:
            raise UserError(f"--recover-{next(iter(given))} applies to --recover blockwise only")
        return None
    if recover not in METHODS:
        raise UserError(f"unknown --recover '{recover}' (choose from none, {', '.join(METHODS)})")
    check_recipe(recipe)
    return BlockwiseRecovery(BlockwiseOptions(seed=recipe.seed, **given), bits=recipe.wbits)
