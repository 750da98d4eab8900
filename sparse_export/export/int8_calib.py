"""Activations of the INT8 graph in torch: static per-tensor ranges from calibration text, and the
fake-quantized model the INT8 ONNX reproduces (the reference its outputs are checked against).

Linear inputs: uint8, asymmetric (scale, zero point), one pair per tensor. Attention scores
(query x key): query uint8 like a Linear input, key int8 symmetric, per tensor. The weight grid is
pruning/grid.py. The LM head is one more Linear here (its input: the final norm's output): its weight
gets its own int8 grid, one scale per vocabulary row (untied from the input embedding, which stays
fp32), and its input is quantized like a decoder Linear's (head_module, grid_head, head_choice).
"""

import contextlib
import sys
from collections.abc import Iterator

import torch

from .. import models

HEAD_ROWS = 8192     # rows of the LM head put on its int8 grid at a time


# ---- activations ----------------------------------------------------------------------------

def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 (scale, zero point) covering [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp


@torch.no_grad()
def activation_ranges(model, windows: torch.Tensor, names: list[str], batch: int = 4,
                      percentile: float = 99.99) -> dict[str, dict[str, float]]:
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

    _run_windows(model, windows, batch, [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names])
    out = {}
    for n, v in stats.items():
        t = torch.tensor(v)
        out[n] = {"min": float(t[:, 0].min()), "max": float(t[:, 1].max()),
                  "lo": float(t[:, 2].mean()), "hi": float(t[:, 3].mean())}
    return out


def _run_windows(model, windows: torch.Tensor, batch: int, handles: list) -> None:
    """The calibration windows through `model`, `batch` at a time, with the hooks `handles`; removes them."""
    try:
        for s in range(0, windows.shape[0], batch):
            model(input_ids=windows[s:s + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_quant_errors(model, windows: torch.Tensor, qparams: dict, batch: int = 4) -> dict[str, float]:
    """How much quantizing its input alone changes each Linear module's output, over calibration windows:
    ||x_q W^T - x W^T||^2 / ||x W^T||^2 with x_q the input through uint8 qparams {name: (scale, zp)}.
    `model` needs only get_submodule and a call on input_ids (as activation_ranges)."""
    sums = {n: [0.0, 0.0] for n in qparams}

    def hook(name):
        def fn(module, args, out):
            w = models.weight_2d(module)
            x = args[0]
            y = x @ w.t().to(x.dtype)
            yq = fake_quant_input(x, *qparams[name]) @ w.t().to(x.dtype)
            sums[name][0] += float(((yq - y).float() ** 2).sum())
            sums[name][1] += float((y.float() ** 2).sum())
        return fn

    _run_windows(model, windows, batch, [model.get_submodule(n).register_forward_hook(hook(n)) for n in qparams])
    return {n: e / max(t, 1e-30) for n, (e, t) in sums.items()}


def outlier_ratio(r: dict) -> float:
    """How far the extreme inputs reach beyond the percentile range: max |x| / percentile |x|."""
    return max(-r["min"], r["max"]) / max(-r["lo"], r["hi"], 1e-12)


def fake_quant_input(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """What QuantizeLinear then a dequantize does to x (uint8, round half to even)."""
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


@contextlib.contextmanager
def fake_quantized_inputs(model, qparams: dict) -> Iterator[torch.nn.Module]:
    """Quantize the input of each module in qparams {name: (scale, zp)} while the block runs."""
    def hook(scale, zp):
        return lambda module, args: (fake_quant_input(args[0], scale, zp),) + tuple(args[1:])

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(*p)) for n, p in qparams.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def fake_quant_symmetric(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an int8 QuantizeLinear with zero point 0 then a dequantize does to x."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


# ---- the LM head ----------------------------------------------------------------------------

def head_module(model) -> str | None:
    """Module name of the model's LM head when it is an nn.Linear (the head the INT8 graph quantizes)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def head_is_tied(model, name: str) -> bool:
    """Whether the head's weight is the input embedding's tensor (tie_word_embeddings)."""
    emb = model.get_input_embeddings()
    w = model.get_submodule(name).weight
    return emb is not None and (emb.weight is w or emb.weight.data_ptr() == w.data_ptr())


@torch.no_grad()
def grid_head(model, name: str) -> list[float]:
    """Put the LM head's weight on a symmetric int8 grid, one scale per output (vocabulary) row, rounded to
    nearest, in place. A tied head first gets its own copy of the weight, so the input embedding keeps its
    fp32 table. Returns the scale per row."""
    from ..pruning.grid import make_quantizer

    mod = model.get_submodule(name)
    if head_is_tied(model, name):
        mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    W, scales = models.weight_2d(mod), []
    for r in range(0, W.shape[0], HEAD_ROWS):   # round_weights' grid a block at a time (8B head: 2.1 GB fp32)
        block = W[r:r + HEAD_ROWS]
        quantize, scale = make_quantizer(block.float(), 8, True, headroom=1.0)
        block.copy_(quantize(block.float().t(), None).t().to(block.dtype))
        scales += scale.tolist()
    return scales


def head_choice(name: str | None, ranges: dict | None, outlier_limit: float | None, tied: bool,
                requested: bool = True) -> dict:
    """Whether the LM head runs int8, and why not: the "head" entry of the int8 metadata. The outlier test
    is the decoder Linears' (outlier_ratio of its input range past outlier_limit keeps it fp32)."""
    out = {"module": name, "tied_embeddings": tied, "dtype": "fp32", "reason": None, "input_outlier_ratio": None}
    if name is None:
        out["reason"] = "no LM head Linear in the graph"
    elif not requested:
        out["reason"] = "--fp32-head"
    else:
        ratio = outlier_ratio(ranges)
        out["input_outlier_ratio"] = ratio
        if outlier_limit and ratio > outlier_limit:
            out["reason"] = (f"its input (the final norm's output) reaches {ratio:.1f} x past its 99.99th "
                             f"percentile (limit {outlier_limit:g})")
        else:
            out.update(dtype="int8", weights="int8 symmetric, one scale per vocabulary row, round-to-nearest")
    return out


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
def recording_attention(model, enabled: bool = True) -> Iterator[dict]:
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


def attention_qparams(ranges: dict) -> dict:
    """{module: {"query": (scale, zero point) uint8, "key": scale int8}} from recording_attention."""
    return {n: {"query": act_qparams(*r["query"]), "key": max(r["key"], 1e-8) / 127.0}
            for n, r in ranges.items()}


@contextlib.contextmanager
def fake_int8(model, qparams: dict, attention: dict | None = None) -> Iterator[torch.nn.Module]:
    """The INT8 graph's arithmetic in torch while the block runs: the input of each Linear module in
    qparams {name: (scale, zp)} quantized to uint8, and for each attention module in `attention`
    (from attention_qparams) the query and key of the score matmul quantized (uint8 / int8)."""
    def hook(p):
        return lambda q, k: (fake_quant_input(q, *p["query"]), fake_quant_symmetric(k, p["key"]))

    with fake_quantized_inputs(model, qparams), \
            _attention_hooks(model, {n: hook(p) for n, p in (attention or {}).items()}):
        yield model
