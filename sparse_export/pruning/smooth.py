"""SmoothQuant-style migration of activation outliers into the weights (Xiao et al., 2023), before pruning.

A Linear layer computes X W^T. For any per-input-channel s > 0, (X / s)(W s)^T is the same product: the
outlier channels of the input shrink, the matching weight columns grow, and one static per-tensor int8
range then fits the input far better. s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), W the consumers
sharing the input side by side; alpha is the share of the difficulty moved into the weights. The 1/s
is folded into what produces X (archs: Arch.smooth_pairs): a norm's weight (and bias), or a Linear's
output rows when only maps linear in them lie between (v_proj -> attention -> o_proj, up_proj -> gate
product -> down_proj). The model computes the same function in fp32 and nothing is added to any graph.

Layer by layer: a layer's channel maxima come from its own calibration inputs (it runs once over them
first), so the pruner then sees, and compensates for, the smoothed inputs. driver.prune_layer calls
begin_smoothing before pruning a layer and finish_smoothing after, for the in-memory and the streamed
prune alike; smooth_model smooths a whole model in memory.
"""

import torch

from .. import archs, models
from ..layerwise import capture_first_layer_inputs, layer_out, to_device


def smooth_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = x_max_j^alpha / w_max_j^(1 - alpha); 1 for a channel whose input or weights are all zero
    (nothing to balance, and no division by zero)."""
    x, w = x_max.double(), w_max.double()
    live = (x > 0) & (w > 0)
    s = x.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s)).float()


def _channel_map(layer, producer: str, consumer: str) -> torch.Tensor:
    """For each input channel of `consumer`, the output channel of `producer` it carries: the identity,
    or for grouped-query attention (v_proj -> o_proj) query head h reads key/value head h // groups."""
    n_in = models.weight_2d(layer.get_submodule(consumer)).shape[1]
    prod = layer.get_submodule(producer)
    n_out = models.weight_2d(prod).shape[0] if models.prunable(prod) else prod.weight.numel()
    c = torch.arange(n_in)
    if n_in == n_out:
        return c
    head_dim = getattr(layer.get_submodule(producer.rpartition(".")[0]), "head_dim", None)
    if not head_dim or n_in % n_out or n_out % head_dim:
        raise ValueError(f"{consumer} reads {n_in} channels, {producer} writes {n_out}: no head map")
    groups = n_in // n_out
    return (c // head_dim) // groups * head_dim + c % head_dim


def _reduce(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Max of `values` over the consumer channels that map to each producer channel."""
    out = torch.zeros(n, dtype=values.dtype)
    return out.scatter_reduce(0, index, values, "amax", include_self=True)


@torch.no_grad()
def input_maxima(layer, names: list[str], hidden, kwargs: list, device=None) -> dict[str, torch.Tensor]:
    """max |x| per input channel of each module in `names` (inside `layer`), over every calibration chunk
    (hidden[i] with kwargs[i]), as float32 on the host."""
    found = {n: None for n in names}
    last = [None, None]                      # q/k/v (gate/up) read one tensor: measure it once

    def hook(name):
        def fn(module, args):
            x = args[0]
            if x is not last[0]:
                last[:] = [x, x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()]
            found[name] = last[1] if found[name] is None else torch.maximum(found[name], last[1])
        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i, kw in enumerate(kwargs):
            layer(to_device(hidden[i], device), **to_device(kw, device))
            last[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
    return found


def _scale_rows(module, s: torch.Tensor) -> None:
    """Divide the producer's outputs by s: a norm's weight and bias, or a Linear's output rows and bias."""
    if models.prunable(module):
        w = models.weight_2d(module)
        models.set_weight_2d(module, w.float() / s.to(w.device).reshape(-1, 1))
    else:
        module.weight.data.copy_(module.weight.data.float() / s.to(module.weight.device))
    if getattr(module, "bias", None) is not None:
        module.bias.data.copy_(module.bias.data.float() / s.to(module.bias.device))


class Pending:
    """A layer being smoothed: every fold done except the Linear producers' rows, whose outputs a hook
    divides by s meanwhile (the layer computes the smoothed function throughout)."""

    def __init__(self, layer):
        self.layer, self.rows, self.hooks, self.record = layer, {}, [], {}


@torch.no_grad()
def begin_smoothing(layer, hidden, kwargs: list, alpha: float, device=None) -> Pending:
    """Smooth one decoder layer in place from its calibration inputs (hidden[i], kwargs[i] per chunk); every
    scale comes from the layer as it was. Norms and consumer columns are folded now. A Linear producer's rows
    (v_proj, up_proj) wait for finish_smoothing: pruned first, in its own row scale, because SparseGPT picks
    one mask per matrix and rows scaled by 1/s would lose their share of it (the whole output channel of a
    massive activation would be pruned away); column scales leave its choice unchanged."""
    pending = Pending(layer)
    pairs = archs.arch_of_layer(layer).smooth_pairs(layer)
    if not pairs:
        return pending
    x_max = input_maxima(layer, sorted({c for _, cs in pairs for c in cs}), hidden, kwargs, device)
    plans = []
    for producer, consumers in pairs:
        maps = {c: _channel_map(layer, producer, c) for c in consumers}
        n = int(max(int(m.max()) for m in maps.values())) + 1
        xm = torch.stack([_reduce(x_max[c], maps[c], n) for c in consumers]).amax(0)
        wm = torch.stack([_reduce(models.weight_2d(layer.get_submodule(c)).detach().abs().amax(0).float().cpu(),
                                  maps[c], n) for c in consumers]).amax(0)
        plans.append((producer, maps, smooth_scales(xm, wm, alpha)))
    for producer, maps, s in plans:
        mod = layer.get_submodule(producer)
        if models.prunable(mod):
            pending.rows[producer] = s
            pending.hooks.append(mod.register_forward_hook(_divide_output(s)))
        else:
            _scale_rows(mod, s)
        for c, m in maps.items():
            cm = layer.get_submodule(c)
            w = models.weight_2d(cm)
            models.set_weight_2d(cm, w.float() * s[m].to(w.device).reshape(1, -1))
        pending.record[producer] = [float(s.min()), float(s.max())]
    return pending


def _divide_output(s: torch.Tensor):
    def fn(module, args, out):
        return (out.float() / s.to(out.device)).to(out.dtype)
    return fn


@torch.no_grad()
def finish_smoothing(pending: Pending, mods: dict | None = None, stats: dict | None = None) -> dict[str, list[float]]:
    """Fold the waiting rows into their producers (after pruning). A producer pruned onto an int8 grid
    (stats[name]["scale"], one per row) moves to the grid scale / s, its integers unchanged, so it stays
    exactly on its recorded grid. mods: {full name: module} of the pruned modules; stats: the pruner's
    per-matrix record. Returns {producer (name in the layer): [smallest, largest scale]}."""
    for h in pending.hooks:
        h.remove()
    names = {id(m): n for n, m in (mods or {}).items()}
    for producer, s in pending.rows.items():
        mod = pending.layer.get_submodule(producer)
        entry = (stats or {}).get(names.get(id(mod)), {})
        if "scale" in entry:
            old = torch.tensor(entry["scale"], dtype=torch.float32)
            new = old / s
            ints = torch.round(models.weight_2d(mod).float().cpu() / old.reshape(-1, 1))
            models.set_weight_2d(mod, (ints * new.reshape(-1, 1)).to(mod.weight.device))
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.copy_(mod.bias.data.float() / s.to(mod.bias.device))
            entry["scale"] = new.tolist()
        else:
            _scale_rows(mod, s)
    pending.rows, pending.hooks = {}, []
    return pending.record


def smooth_layer(layer, hidden, kwargs: list, alpha: float, device=None) -> dict[str, list[float]]:
    """begin_smoothing then finish_smoothing at once (no pruning between). Returns the record."""
    return finish_smoothing(begin_smoothing(layer, hidden, kwargs, alpha, device))


@torch.no_grad()
def smooth_model(model, calib_ids: torch.Tensor, alpha: float, batch: int = 8) -> dict[str, dict]:
    """Smooth every decoder layer of an in-memory model in place, layer by layer on the calibration windows
    [n, seqlen]. Returns {layer index: smooth_layer's record}."""
    hidden, kwargs = capture_first_layer_inputs(model, calib_ids, batch)
    record = {}
    for i, layer in enumerate(models.decoder_layers(model)):
        record[i] = smooth_layer(layer, hidden, kwargs, alpha)
        hidden = [layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    return record
