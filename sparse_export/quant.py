"""Integer grids in torch: the weight grid of a --wbits model, rounding a pruned model afterwards
("prune then round", the baseline for joint pruning + quantization), and static per-tensor
activation ranges with the fake-quantized model that the INT8 ONNX reproduces.

Weights: symmetric, zero point 0, int8 values w / scale in [-128, 127], scale per output channel or
per matrix. Activations: uint8, asymmetric (scale, zero point), one pair per tensor, from calibration.
"""

import contextlib

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
