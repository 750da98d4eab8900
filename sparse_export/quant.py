"""Integer grids in torch: the weight grid of a --wbits model, rounding a pruned model afterwards
("prune then round", the baseline for joint pruning + quantization), and static per-tensor
activation ranges with the fake-quantized model that the INT8 ONNX reproduces.

Weights: symmetric, zero point 0, int8 values w / scale in [-128, 127], scale per output channel or
per matrix. Activations: uint8, asymmetric (scale, zero point), one pair per tensor, from calibration.
Attention scores (query x key): query uint8 like a Linear input, key int8 symmetric, per tensor.
"""

import contextlib
import sys

import torch

from . import models
from .errors import UserError
from .prune import make_quantizer


def grid_info(bits, per_channel, method):
    """What sparse_export.json records about the weight grid."""
    return {"bits": bits, "symmetric": True, "zero_point": 0, "qmin": -2 ** (bits - 1),
            "qmax": 2 ** (bits - 1) - 1, "granularity": "per-channel" if per_channel else "per-tensor",
            "scale_key": "matrices[name].scale (one value per output row)", "method": method}


def round_weights(model, bits=8, per_channel=True, names=None):
    """Round every prunable matrix onto a symmetric grid (scales from the weights as they are now).

    Zeros stay zero. Returns {name: scale per output row (list)}.
    """
    names = names if names is not None else models.prunable_names(model)
    scales = {}
    with torch.no_grad():
        for name in names:
            mod = model.get_submodule(name)
            W = models.weight_2d(mod).float()
            quantize, scale = make_quantizer(W, bits, per_channel, headroom=1.0)  # no updates follow
            models.set_weight_2d(mod, quantize(W.t(), None).t())   # the quantizer takes columns
            scales[name] = scale.tolist()
    return scales


def int_weight(W, scale, bits=8, tol=1e-3, name="weights"):
    """W (out x in) as integers on the grid given by `scale` (per row); checks it is on the grid."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
    x = W.float() / scale
    q = torch.round(x)
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    if float((x - q).abs().max()) > tol or q.min() < lo or q.max() > hi:
        raise UserError(f"{name} are not on their recorded {bits}-bit grid "
                        f"(max distance {float((x - q).abs().max()):.3g} steps)")
    return q.to(torch.int8)


def recorded_scales(meta, names):
    """{name: scale list} from a pruned folder's sparse_export.json; {} when it has no int grid."""
    wbits = (meta.get("recipe") or {}).get("wbits")
    if not wbits or wbits > 8:
        return {}
    mats = meta.get("matrices") or {}
    return {n: mats[n]["scale"] for n in names if "scale" in mats.get(n, {})}


# ---- activations ----------------------------------------------------------------------------

def act_qparams(lo, hi):
    """uint8 (scale, zero point) covering [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp


@torch.no_grad()
def activation_ranges(model, windows, names, batch=4, percentile=99.99):
    """Static ranges of the input of each module in `names`, over calibration windows.

    Returns {name: {"min", "max", "lo", "hi"}}: min / max over all tokens, and lo / hi the mean
    over batches of the (100 - p)th and p-th percentiles (a range that clips rare outliers).
    """
    stats, last = {n: [] for n in names}, [None, None]    # last input tensor and its numbers

    def measure(x):
        x = x.detach().float().flatten()
        k = max(1, int(round(x.numel() * (1 - percentile / 100))))
        return [float(x.min()), float(x.max()), float(x.topk(k, largest=False).values.max()),
                float(x.topk(k).values.min())]

    def hook(name):
        def fn(module, args):
            if args[0] is not last[0]:                      # q/k/v (gate/up) get the same tensor
                last[:] = [args[0], measure(args[0])]
            stats[name].append(last[1])
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for s in range(0, windows.shape[0], batch):
            model(input_ids=windows[s:s + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, v in stats.items():
        t = torch.tensor(v)
        out[n] = {"min": float(t[:, 0].min()), "max": float(t[:, 1].max()),
                  "lo": float(t[:, 2].mean()), "hi": float(t[:, 3].mean())}
    return out


def outlier_ratio(r):
    """How far the extreme inputs reach beyond the percentile range: max |x| / percentile |x|."""
    return max(-r["min"], r["max"]) / max(-r["lo"], r["hi"], 1e-12)


def fake_quant_input(x, scale, zp):
    """What QuantizeLinear then a dequantize does to x (uint8, round half to even)."""
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


@contextlib.contextmanager
def fake_quantized_inputs(model, qparams):
    """Quantize the input of each module in qparams {name: (scale, zp)} while the block runs."""
    def hook(scale, zp):
        return lambda module, args: (fake_quant_input(args[0], scale, zp),) + tuple(args[1:])

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(*p)) for n, p in qparams.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def fake_quant_symmetric(x, scale):
    """What an int8 QuantizeLinear with zero point 0 then a dequantize does to x."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


# ---- attention scores ------------------------------------------------------------------------
# The model's own eager attention, with the query and key seen by the score matmul passed through
# a hook first: to measure their ranges, or to quantize them as the INT8 graph does.

ATTENTION_FN = "sparse_export_int8"
_HOOKS = {}          # attention module -> fn(query, key) -> (query, key)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    hook = _HOOKS.get(module)
    if hook is not None:
        query, key = hook(query, key)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextlib.contextmanager
def _attention_hooks(model, hooks):
    """Run the attention modules in `hooks` {name: fn} through their hook while the block runs."""
    if not hooks:
        yield model
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_FN, _attention)
    AttentionMaskInterface.register(ATTENTION_FN, eager_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_FN)
    _HOOKS.update({model.get_submodule(n): fn for n, fn in hooks.items()})
    try:
        yield model
    finally:
        for n in hooks:
            _HOOKS.pop(model.get_submodule(n), None)
        model.set_attn_implementation(before)


@contextlib.contextmanager
def recording_attention(model, enabled=True):
    """Yields {attention module: {"query": [min, max], "key": max |key|}}, filled by the forward passes
    run inside the block (e.g. activation_ranges' calibration pass); {} when not enabled."""
    stats = {n: {"query": [float("inf"), float("-inf")], "key": 0.0}
             for n in (models.attention_names(model) if enabled else [])}

    def hook(name):
        def fn(query, key):
            s = stats[name]
            s["query"] = [min(s["query"][0], float(query.min())), max(s["query"][1], float(query.max()))]
            s["key"] = max(s["key"], float(key.abs().max()))
            return query, key
        return fn

    with _attention_hooks(model, {n: hook(n) for n in stats}):
        yield stats


def attention_qparams(ranges):
    """{module: {"query": (scale, zero point) uint8, "key": scale int8}} from recording_attention."""
    return {n: {"query": act_qparams(*r["query"]), "key": max(r["key"], 1e-8) / 127.0}
            for n, r in ranges.items()}


@contextlib.contextmanager
def fake_int8(model, qparams, attention=None):
    """The INT8 graph's arithmetic in torch while the block runs: the input of each Linear module in
    qparams {name: (scale, zp)} quantized to uint8, and for each attention module in `attention`
    (from attention_qparams) the query and key of the score matmul quantized (uint8 / int8)."""
    def hook(p):
        return lambda q, k: (fake_quant_input(q, *p["query"]), fake_quant_symmetric(k, p["key"]))

    with fake_quantized_inputs(model, qparams), \
            _attention_hooks(model, {n: hook(p) for n, p in (attention or {}).items()}):
        yield model


def round_pruned_folder(src, out, bits=8, per_channel=True, force=False, log=print):
    """Prune then round: load a pruned model folder, round its matrices, save it with the scales.

    The baseline that joint SparseGPT + quantization should beat; same grid, same metadata layout.
    """
    from .jobs import save_model_folder
    from .outputs import atomic_dir, read_meta

    model, tokenizer = models.load_model(src)
    meta = read_meta(src)
    mats = meta.setdefault("matrices", {})
    with atomic_dir(out, force) as tmp:
        for name, scale in round_weights(model, bits, per_channel).items():
            w = models.weight_2d(model.get_submodule(name))
            mats.setdefault(name, {"shape": list(w.shape)})
            mats[name].update(scale=scale, sparsity=float((w == 0).float().mean()))
        meta.setdefault("recipe", {}).update(wbits=bits, per_channel=per_channel)
        meta["quantization"] = grid_info(bits, per_channel, "round-after-pruning")
        meta["rounded_from"] = str(src)
        save_model_folder(model, tokenizer, tmp, meta)
    log(f"rounded {len(mats)} matrices of {src} onto the {bits}-bit grid; wrote {out}")
    return meta
