"""Sequential one-shot pruning of a causal LM, one decoder layer at a time.

The inputs of the first decoder layer are captured once. For each layer: run it over the
calibration batch with hooks that accumulate one Hessian per distinct input (q/k/v share one,
gate/up share one), prune every Linear, then run the pruned layer again; its outputs are the
next layer's inputs. Only one layer's Hessians live at a time. `prune_layer` is one layer's turn;
`prune_model` runs it over a model in memory, pruning/stream.py over a model read from its shards.
With --allocation owl, one pass over the dense layers first gives each layer its sparsity (owl.py).
"""

import contextlib
import time
from dataclasses import replace

import torch

from .. import archs, models
from ..layerwise import LayerBar, capture_first_layer_inputs, layer_out, pick_device, run_layer, to_device
from ..outputs import Timer, library_versions, peak_rss_gib
from .grid import QUANT_HEADROOM, GroupQuantizer, check_group_widths, grid_info, make_quantizer
from .owl import layer_outlier_ratio, owl_record
from .pruners import hessian_inverse_factor
from .recipe import Recipe
from .smooth import begin_smoothing, finish_smoothing


PHASES = ("hessian", "factor", "sweep")


class Clock:
    """Seconds one layer spends accumulating Hessians, factoring them and sweeping columns."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


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

    def __init__(self, clock: Clock | None = None):
        self.H, self.tokens, self.group_of, self._seen = {}, {}, {}, {}
        self.clock = clock or Clock()

    def add(self, name, x):
        key = (x.data_ptr(), tuple(x.shape))
        group = self._seen.get(key, (None,))[0]
        if group is not None:
            self.group_of.setdefault(name, group)
            return group
        group = self.group_of.setdefault(name, name)
        self._seen[key] = (group, x)               # hold x so its address is not reused this pass
        with self.clock("hessian"):
            x2 = x.reshape(-1, x.shape[-1]).float()
            if group not in self.H:
                self.H[group] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
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
    if recipe.wbits and recipe.group_size:
        quantizer = GroupQuantizer(W.shape[0], W.shape[1], recipe.wbits, recipe.group_size,
                                   clip_search=recipe.clip_search)
        scale = quantizer.scale                    # filled in by the sweep
    elif recipe.wbits:
        quantizer, scale = make_quantizer(W.float(), recipe.wbits, recipe.per_channel, splits)
    own = {kw: getattr(recipe, f) for f, kw in recipe.pruner.options.items()}
    Wn, mask, loss = recipe.pruner.fn(W, H, sparsity=recipe.sparsity, n=n, m=m,
                                     blocksize=recipe.blocksize, dampening=recipe.dampening,
                                     row_splits=splits, quantizer=quantizer,
                                     **({"factor": factor} if factor is not None else {}), **own)
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


def _prune_names(mods, names, H, recipe, stats, factor=None, clock=None):
    clock = clock or Clock()
    t0 = time.perf_counter()
    with clock("sweep"):
        weights = [models.weight_2d(mods[n]).float() for n in names]
        new, _, loss, scales = prune_group(H, weights, recipe, factor)
        _store(mods, names, new, loss, scales, time.perf_counter() - t0, stats)


def _factor(H, recipe, clock):
    with clock("factor"):
        return hessian_inverse_factor(H, recipe.dampening)


def _layer_one_pass(layer, mods, hidden, kw, recipe, stats, clock=None):
    """One forward: each module is pruned when first called, from the (already pruned) upstream."""
    clock = clock or Clock()
    st = _InputStats(clock)
    names_by_mod = {id(m): n for n, m in mods.items()}

    factors = {}

    def pre(module, args):
        name = names_by_mod[id(module)]
        group = st.add(name, args[0])
        H = st.hessian(group)
        factor = None
        if recipe.pruner.shares_factor:  # q/k/v (gate/up) share one input: factor H once
            if group not in factors:
                factors[group] = _factor(H, recipe, clock)
            factor = factors[group]
        _prune_names(mods, [name], H, recipe, stats, factor, clock)

    handles = [m.register_forward_pre_hook(pre) for m in mods.values()]
    try:
        return layer_out(layer(hidden, **kw))
    finally:
        for h in handles:
            h.remove()


def _layer_two_pass(layer, mods, hidden, kwargs, recipe, stats, device=None, out=None, clock=None):
    """Chunked: accumulate Hessians over all chunks with dense weights, prune, run again.

    hidden: chunks on the host (a list or an Activations store); each goes to `device` for its
    forward. The outputs go to `out` (a store) when given, else they are returned as a list."""
    clock = clock or Clock()
    st = _InputStats(clock)
    def hook(name):
        def fn(module, args, output):
            st.add(name, args[0])          # returns None: the output is left alone
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        for i, kw in enumerate(kwargs):
            st.next_pass()
            layer(to_device(hidden[i], device), **to_device(kw, device))
    finally:
        for h in handles:
            h.remove()
    st.next_pass()
    for group, names in st.groups(mods).items():
        H = st.hessian(group)
        # the factor SparseGPT would compute itself, computed here to time it apart from the sweep
        factor = _factor(H, recipe, clock) if recipe.pruner.shares_factor else None
        _prune_names(mods, names, H, recipe, stats, factor, clock)
    return run_layer(layer, hidden, kwargs, device, out)


def layer_modules(model, i: int, targets) -> dict:
    """{full name: module} of the prunable modules of decoder layer i that are in `targets`."""
    prefix = archs.arch_of(model).layers
    layer = models.decoder_layers(model)[i]
    return {f"{prefix}.{i}.{n}": mod for n, mod in layer.named_modules()
            if models.prunable(mod) and f"{prefix}.{i}.{n}" in targets}


@torch.no_grad()
def prune_layer(layer, mods: dict, hidden, kwargs: list, recipe: Recipe, stats: dict, one_pass: bool,
                device: torch.device | None = None, out=None) -> tuple[object, dict]:
    """One layer's turn: prune `mods` (its modules) from the calibration chunks `hidden`.

    Returns (the layer's outputs: `out` when given, else a list of chunks on the host; or None
    without calibration, and the layer's timing {wall_s, cpu_s, forward_s, hessian_s, factor_s, sweep_s}).
    The layer runs on `device` (it is moved there); the chunks go there one at a time."""
    device = device or torch.device("cpu")
    clock = Clock()
    with Timer() as t:
        layer.to(device)
        result = None
        smoothed = pending = None
        if recipe.smooth and hidden is not None:   # --smooth: activation outliers into the weights first
            pending = begin_smoothing(layer, hidden, kwargs, recipe.smooth, device)
        if not recipe.pruner.needs_calibration:
            for name in mods:
                _prune_names(mods, [name], None, recipe, stats, clock=clock)
        elif one_pass:
            h = layer_out(_layer_one_pass(layer, mods, to_device(hidden[0], device), to_device(kwargs[0], device),
                                          recipe, stats, clock)).to("cpu")
            if out is None:
                result = [h]
            else:
                out[0] = h
                result = out
        else:
            result = _layer_two_pass(layer, mods, hidden, kwargs, recipe, stats, device, out, clock)
        if pending is not None:                    # v_proj / up_proj rows: scaled once they are pruned
            smoothed = finish_smoothing(pending, mods, stats)
    timing = {"wall_s": t.wall, "cpu_s": t.cpu, **{f"{k}_s": v for k, v in clock.seconds.items()}}
    timing["forward_s"] = max(0.0, timing["wall_s"] - sum(clock.seconds.values()))
    timing["peak_gib"] = peak_rss_gib()
    if smoothed is not None:
        timing["smooth_scales"] = smoothed             # {producer: [smallest, largest scale]}
    if device.type == "cuda":
        timing["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result, timing


def calibration_mode(model, recipe: Recipe, ntokens: int, one_pass: bool | None = None) -> tuple[bool, str]:
    """(one_pass, mode name): one pass when the layer activations of all tokens fit ONE_PASS_BUDGET."""
    if not recipe.pruner.needs_calibration:
        return False, "none"
    if one_pass is None:
        one_pass = one_pass_fits(model, ntokens)
    return one_pass, ("one-pass" if one_pass else "two-pass")


def layer_recipe(recipe: Recipe, allocation: dict | None, i: int) -> Recipe:
    """The recipe layer i is pruned with: its own sparsity under an allocation (owl.owl_record)."""
    if not allocation:
        return recipe
    return replace(recipe, sparsity=allocation["layers"][i]["sparsity"])


@torch.no_grad()
def owl_allocation(model, hidden, kwargs: list, targets, recipe: Recipe, device: torch.device,
                   progress: bool = True) -> dict:
    """OWL's per-layer sparsities from one pass of the calibration chunks `hidden` (the first layer's
    inputs, left as they are) through the dense layers."""
    ratios, counts = [], []
    bar = LayerBar(len(models.decoder_layers(model)), "outlier ratios (owl)", device, progress)
    for i, layer in enumerate(models.decoder_layers(model)):
        hidden, ratio, count = layer_outlier_ratio(layer, layer_modules(model, i, targets), hidden, kwargs,
                                                   recipe.owl_threshold, device)
        if device.type != "cpu":
            layer.to("cpu")
        ratios.append(ratio)
        counts.append(count)
        bar.step()
    bar.close()
    return owl_record(recipe, ratios, counts)


@torch.no_grad()
def prune_model(model, calib_ids, recipe: Recipe, batch: int = 8, progress: bool = True,
                one_pass: bool | None = None, device: str | torch.device = "cpu",
                layer_log: list | None = None, allocation: dict | None = None,
                after_layer=None) -> tuple[dict, str]:
    """Prune `model` (in memory, on the host) in place. Returns (per-matrix stats {name: {...}}, calibration mode).

    one_pass: run each layer once over all calibration tokens, pruning every module from the
    outputs of the already-pruned modules before it (default when the activations fit in
    ONE_PASS_BUDGET); otherwise run chunks of `batch` samples twice per layer.
    device: where each layer runs during its turn (then it goes back to the host).
    layer_log: a list that receives each layer's timing.
    allocation: a dict that receives the per-layer sparsities (--allocation owl: owl.owl_record).
    after_layer: a hook run around each layer's prune (recovery/blockwise.py BlockwiseRecovery): its
    before() sees the dense layer, its after() may change the pruned layer and returns its outputs.
    """
    recipe.validate()
    device = device if isinstance(device, torch.device) else pick_device(device)
    layers = models.decoder_layers(model)
    targets = set(models.prunable_names(model, recipe.ignore))
    check_group_widths(model, targets, recipe.group_size)
    needs_data = recipe.pruner.needs_calibration
    one_pass, mode = calibration_mode(model, recipe, calib_ids.numel() if needs_data else 0, one_pass)
    stats = {}
    hidden, kwargs = None, []
    if needs_data:
        hidden, kwargs = capture_first_layer_inputs(model, calib_ids, calib_ids.shape[0] if one_pass else batch)

    plan = None
    if recipe.allocation == "owl":
        plan = owl_allocation(model, hidden, kwargs, targets, recipe, device, progress)
        if allocation is not None:
            allocation.update(plan)

    if after_layer is not None:
        after_layer.begin(hidden)
    bar = LayerBar(len(layers), f"pruning ({recipe.method})", device, progress)
    for i, layer in enumerate(layers):
        mods = layer_modules(model, i, targets)
        if after_layer is not None:
            after_layer.before(i, layer, hidden, kwargs, device)
        out, timing = prune_layer(layer, mods, hidden, kwargs, layer_recipe(recipe, plan, i), stats, one_pass,
                                  device)
        if after_layer is not None:
            out, timing["recovery"] = after_layer.after(i, layer, mods, hidden, kwargs, device, out, stats=stats)
        hidden = out
        if device.type != "cpu":
            layer.to("cpu")
        if layer_log is not None:
            layer_log.append({"layer": i, **timing})
        bar.step(hook_note(timing))
    bar.close()
    return stats, mode


def hook_note(timing: dict) -> str:
    """The progress bar's note on a layer's recovery: its reconstruction error before -> after."""
    rec = timing.get("recovery")
    return f"error {rec['before']:.3g} -> {rec['after']:.3g}" if rec else ""


def _measured(stats: dict, names=None) -> tuple[float, int]:
    """(zero weights, weights) over the matrices `names` of stats (all when None)."""
    rows = [s for n, s in stats.items() if names is None or n in names]
    total = sum(s["shape"][0] * s["shape"][1] for s in rows)
    return sum(s["sparsity"] * s["shape"][0] * s["shape"][1] for s in rows), total


def _allocation_meta(model, allocation: dict, stats: dict) -> dict:
    """The allocation with each layer's measured sparsity beside its planned one."""
    prefix = archs.arch_of(model).layers
    layers = []
    for x in allocation["layers"]:
        head = f"{prefix}.{x['layer']}."
        zeros, total = _measured(stats, {n for n in stats if n.startswith(head)})
        layers.append({**x, "measured_sparsity": zeros / total if total else None})
    return {**allocation, "layers": layers}


def pruned_meta(model, recipe: Recipe, stats: dict, mode: str, dev, layer_log: list, timing: dict, source,
                allocation: dict | None = None, **extra) -> dict:
    """The sparse_export.json of a pruned model folder (in memory or streamed; `extra`: path-specific keys).

    allocation: the per-layer sparsities (owl.owl_record) when they are not uniform."""
    zeros, total = _measured(stats)
    return {
        "kind": "pruned-model",
        "source_model": str(source),
        "architecture": archs.model_type(model),
        "recipe": recipe.to_dict(),
        **({"quantization": {**grid_info(recipe.wbits, recipe.per_channel, f"joint-{recipe.method}", recipe.group_size),
                              "scale_headroom": QUANT_HEADROOM if recipe.wbits == 8 else 1.0}}
           if recipe.wbits else {}),
        "pruned_sparsity": zeros / max(total, 1),
        **({"allocation": _allocation_meta(model, allocation, stats)} if allocation else {}),
        "calibration_mode": mode,
        "matrices": stats,
        "device": str(dev),
        **extra,
        "layers": layer_log,
        "timing": {**timing, "threads": torch.get_num_threads()},
        "peak_memory_gib": peak_rss_gib(),
        **({"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30} if dev.type == "cuda" else {}),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
