"""Sequential one-shot pruning of a causal LM, one decoder layer at a time.

The inputs of the first decoder layer are captured once. For each layer: run it over the
calibration batch with hooks that accumulate one Hessian per distinct input (q/k/v share one,
gate/up share one), prune every Linear, then run the pruned layer again; its outputs are the
next layer's inputs. Only one layer's Hessians live at a time.
"""

import time

import torch
from tqdm import tqdm

from .. import archs, models
from .grid import make_quantizer
from .pruners import hessian_inverse_factor
from .recipe import Recipe


def _chunks(total, size):
    return [(s, min(s + size, total)) for s in range(0, total, size)]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(model, ids: torch.Tensor, batch: int) -> tuple[list, list]:
    """Hidden states entering decoder layer 0 (all samples) and its keyword arguments per chunk."""
    layers = models.decoder_layers(model)
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        kwargs.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for s, e in _chunks(ids.shape[0], batch):
            try:
                model(input_ids=ids[s:e], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def gram_(H: torch.Tensor, X: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """H += alpha * X^T X, computing only the upper block triangle (X^T X is symmetric)."""
    n = X.shape[1]
    nb = max(1, min(4, n // 256))
    e = [round(i * n / nb) for i in range(nb + 1)]
    for i in range(nb):
        for j in range(i, nb):
            H[e[i]:e[i + 1], e[j]:e[j + 1]].addmm_(X[:, e[i]:e[i + 1]].t(), X[:, e[j]:e[j + 1]],
                                                   alpha=alpha)
    return H


def symmetric(H: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle filled by gram_ into a full symmetric matrix."""
    return torch.triu(H) + torch.triu(H, 1).t()


class _InputStats:
    """Hessians of the inputs of pruned modules, one per distinct input tensor.

    Modules that receive the same tensor in a forward pass (q/k/v, gate/up) share one Hessian.
    """

    def __init__(self):
        self.H, self.tokens, self.group_of, self._seen = {}, {}, {}, {}

    def add(self, name, x):
        key = (x.data_ptr(), tuple(x.shape))
        group = self._seen.get(key, (None,))[0]
        if group is not None:
            self.group_of.setdefault(name, group)
            return group
        group = self.group_of.setdefault(name, name)
        self._seen[key] = (group, x)               # hold x so its address is not reused this pass
        x2 = x.reshape(-1, x.shape[-1]).float()
        if group not in self.H:
            self.H[group] = torch.zeros(x2.shape[1], x2.shape[1])
            self.tokens[group] = 0
        gram_(self.H[group], x2)
        self.tokens[group] += x2.shape[0]
        return group

    def next_pass(self):
        self._seen = {}

    def hessian(self, group):
        return symmetric(self.H[group]) / max(self.tokens[group], 1)

    def groups(self, names):
        """{group: [member names in module order]}."""
        out = {}
        for name in names:
            out.setdefault(self.group_of[name], []).append(name)
        return out


def prune_group(H: torch.Tensor, weights: list[torch.Tensor], recipe: Recipe,
                factor: tuple | None = None) -> tuple[tuple, tuple, float | None, tuple | None]:
    """Prune matrices that share one input as one sweep; returns new weights, masks, loss, scales."""
    W = torch.cat(weights, dim=0)
    n, m = recipe.nm()
    splits = [w.shape[0] for w in weights]
    quantizer, scale = None, None
    if recipe.wbits:
        quantizer, scale = make_quantizer(W.float(), recipe.wbits, recipe.per_channel, splits)
    Wn, mask, loss = recipe.pruner.fn(W, H, sparsity=recipe.sparsity, n=n, m=m,
                                     blocksize=recipe.blocksize, dampening=recipe.dampening,
                                     row_splits=splits, quantizer=quantizer,
                                     **({"factor": factor} if factor is not None else {}))
    return Wn.split(splits), mask.split(splits), loss, (scale.split(splits) if scale is not None else None)


ONE_PASS_BUDGET = 3 * 2**30  # bytes of layer activations that may live at once


def one_pass_fits(model, ntokens: int) -> bool:
    """Whether a whole decoder layer can run on all calibration tokens at once."""
    arch = archs.arch_of(model)
    hidden, inner = arch.hidden_size(model.config), arch.inner_size(model.config)
    return ntokens * (hidden + inner) * 4 * 6 <= ONE_PASS_BUDGET


def _store(mods, names, new, loss, scales, secs, stats):
    for k, name in enumerate(names):
        models.set_weight_2d(mods[name], new[k])
        w = models.weight_2d(mods[name])
        stats[name] = {"shape": list(w.shape), "sparsity": float((w == 0).float().mean()),
                       "seconds": secs / len(names)}
        if loss is not None:
            stats[name]["obs_loss"] = loss / len(names)
        if scales is not None:
            stats[name]["scale"] = scales[k].tolist()


def _prune_names(mods, names, H, recipe, stats, factor=None):
    t0 = time.perf_counter()
    weights = [models.weight_2d(mods[n]).float() for n in names]
    new, _, loss, scales = prune_group(H, weights, recipe, factor)
    _store(mods, names, new, loss, scales, time.perf_counter() - t0, stats)


def _layer_one_pass(layer, mods, hidden, kw, recipe, stats):
    """One forward: each module is pruned when first called, from the (already pruned) upstream."""
    st = _InputStats()
    names_by_mod = {id(m): n for n, m in mods.items()}

    factors = {}

    def pre(module, args):
        name = names_by_mod[id(module)]
        group = st.add(name, args[0])
        H = st.hessian(group)
        factor = None
        if recipe.pruner.shares_factor:  # q/k/v (gate/up) share one input: factor H once
            if group not in factors:
                factors[group] = hessian_inverse_factor(H, recipe.dampening)
            factor = factors[group]
        _prune_names(mods, [name], H, recipe, stats, factor)

    handles = [m.register_forward_pre_hook(pre) for m in mods.values()]
    try:
        return _layer_out(layer(hidden, **kw))
    finally:
        for h in handles:
            h.remove()


def _layer_two_pass(layer, mods, hidden, kwargs, recipe, stats):
    """Chunked: accumulate Hessians over all chunks with dense weights, prune, run again."""
    st = _InputStats()
    def hook(name):
        def fn(module, args, output):
            st.add(name, args[0])          # returns None: the output is left alone
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            st.next_pass()
            layer(h, **kw)
    finally:
        for h in handles:
            h.remove()
    for group, names in st.groups(mods).items():
        _prune_names(mods, names, st.hessian(group), recipe, stats)
    return [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


@torch.no_grad()
def prune_model(model, calib_ids, recipe: Recipe, batch: int = 8, progress: bool = True,
                one_pass: bool | None = None) -> tuple[dict, str]:
    """Prune `model` in place. Returns (per-matrix stats {name: {...}}, calibration mode).

    one_pass: run each layer once over all calibration tokens, pruning every module from the
    outputs of the already-pruned modules before it (default when the activations fit in
    ONE_PASS_BUDGET); otherwise run chunks of `batch` samples twice per layer.
    """
    recipe.validate()
    layers = models.decoder_layers(model)
    prefix = archs.arch_of(model).layers
    targets = set(models.prunable_names(model, recipe.ignore))
    needs_data = recipe.pruner.needs_calibration
    if needs_data and one_pass is None:
        one_pass = one_pass_fits(model, calib_ids.numel())
    mode = "none" if not needs_data else ("one-pass" if one_pass else "two-pass")
    stats = {}
    if needs_data:
        dev = next(model.parameters()).device
        hidden, kwargs = capture_first_layer_inputs(model, calib_ids.to(dev),
                                                    calib_ids.shape[0] if one_pass else batch)

    bar = tqdm(total=len(layers), desc=f"pruning ({recipe.method})", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        mods = {f"{prefix}.{i}.{n}": mod for n, mod in layer.named_modules()
                if models.prunable(mod) and f"{prefix}.{i}.{n}" in targets}
        if not needs_data:
            for name in mods:
                _prune_names(mods, [name], None, recipe, stats)
        elif one_pass:
            hidden = [_layer_one_pass(layer, mods, hidden[0], kwargs[0], recipe, stats)]
        else:
            hidden = _layer_two_pass(layer, mods, hidden, kwargs, recipe, stats)
        bar.update(1)
    bar.close()
    return stats, mode
