"""A model folder turned into the sparse-cpu model: every decoder Linear and the LM head run on the int8
kernel; embeddings, norms and attention stay the model's own torch modules (float32).

A `prune --wbits 4` folder (or fewer bits; --group-size or per-row scales, float16 values) runs its decoder
matrices on the int4 kernel (packed.pack4); its LM head stays int8, rounded per row.

Weights: a `prune --wbits 8` folder's matrices already lie on a per-row int8 grid (the scales are in
its sparse_export.json) and are read back exactly; everything else (a dense model, the LM head) is
rounded to nearest per row. Activations: each token's input to a Linear is quantized to uint8 with
its own scale and zero point. `FakeQuantLinear` computes the same in torch (exact integer products, or
the usual float32 fake quantization): the reference the kernel's model is checked against.
"""

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ... import checkpoints, models
from ...errors import UserError
from ...outputs import read_meta
from ...pruning.grid import expand_scale, recorded_bits, recorded_group_size, recorded_scales
from .kernel import PATHS, KernelLayer, int8_linear, resolve_path, run_linear
from .packed import PackedLinear, half_exact, int4_grid, int8_grid, pack, pack4

# A bitmask layer reads nnz + in/8 bytes per row instead of in: below this sparsity the dense layout
# reads less (the mask costs 1/8 byte per weight), so "auto" packs such a layer dense.
MASK_MIN_SPARSITY = 0.2
MASK_MIN_SPARSITY_INT4 = 0.25   # int4: values cost 1/2 byte per nonzero, the mask still 1/8 per weight
KERNEL_MODES = ("auto", "sparse", "dense")   # layout per layer: by its sparsity, always bitmask, always dense


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., in] float32 -> (uint8 values as float, scale, zero point) per token, the kernel's grid:
    scale (hi - lo) / 255 with the range widened to hold 0, zero point round(-lo / scale)."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.round(-lo / s).clamp(0, 255)
    return (torch.round(x / s) + zp).clamp(0, 255), s, zp


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """x on the kernel's activation grid (quantized and dequantized)."""
    q, s, zp = quantize_act(x)
    return (q - zp) * s


class Int8Linear(nn.Module):
    """The kernel in place of a Linear (or GPT-2 Conv1D): float32 in, float32 out."""

    def __init__(self, packed: PackedLinear, threads: int = 1, path: str | None = None):
        super().__init__()
        self.kernel = KernelLayer(packed)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.threads, self.path = threads, PATHS[resolve_path(path)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():   # traced: the registered op
            return int8_linear(x, self.kernel.address, self.out_features, self.threads, self.path)
        return run_linear(x, self.kernel.address, self.out_features, self.threads, self.path)

    def extra_repr(self) -> str:
        p = self.kernel.packed
        layout = "dense" if p.dense else f"bitmask, {1 - p.nnz / (p.out_features * p.in_features):.0%} zeros"
        return f"in={self.in_features}, out={self.out_features}, {layout}"


class FakeQuantLinear(nn.Module):
    """The reference in torch: the same int8 weights and uint8 activations.

    exact=True: the integer dot products in float64 (exact at these sizes), scaled in float32 in the
    kernel's order, scale_row * scale_token * ints (+ bias): the kernel's result, computed independently.
    exact=False: the usual fake quantization, dequantized activations @ dequantized weights in float32.
    """

    def __init__(self, q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, exact: bool = True):
        super().__init__()
        self.exact = exact
        self.register_buffer("q", torch.from_numpy(q))
        self.register_buffer("scale", torch.from_numpy(scale))
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.scale.ndim == 2:
            return self._grouped(x)
        if not self.exact:
            return nn.functional.linear(fake_quant_act(x), self.q.float() * self.scale[:, None], self.bias)
        q, s, zp = quantize_act(x)
        ints = (q - zp).double() @ self.q.double().t()
        y = self.scale * s * ints.float()
        return y if self.bias is None else y + self.bias

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """int4 (scale [out, groups]). exact=True follows the int4 kernel's order (kernel.cpp, row4_fast): the
        columns in 64-column words, lane l of a word holding columns 4l..4l+3; per unit (a group of words, or a
        word when groups are 32 columns: lanes 0-7 in its first group, 8-15 in its second) and lane, the
        integers in float64 (exact); 16 float32 lane sums += scale * ints, unit after unit, added pairwise;
        y = token scale * sum (+ bias)."""
        out, n_in = self.q.shape
        groups = self.scale.shape[1]
        if not self.exact:
            w = self.q.float() * expand_scale(self.scale, n_in)
            return nn.functional.linear(fake_quant_act(x), w, self.bias)
        q, s, zp = quantize_act(x)
        words = -(-n_in // 64)
        lead = x.shape[:-1]
        xa = nn.functional.pad((q - zp).double(), (0, 64 * words - n_in)).reshape(*lead, words, 16, 4)
        w = nn.functional.pad(self.q.double(), (0, 64 * words - n_in)).reshape(out, words, 16, 4)
        size = n_in // groups if groups > 1 else 64 * words
        lanes = torch.zeros(*lead, out, 16)
        if size == 32:
            for k in range(words):
                ints = torch.einsum("...lj,olj->...ol", xa[..., k, :, :], w[:, k]).float()
                sc = torch.zeros(out, 16)
                for half in (0, 1):
                    if 2 * k + half < groups:
                        sc[:, 8 * half:8 * half + 8] = self.scale[:, 2 * k + half:2 * k + half + 1]
                lanes = lanes + sc * ints
        else:
            per = size // 64
            for g in range(groups):
                part = slice(g * per, (g + 1) * per)
                ints = torch.einsum("...wlj,owlj->...ol", xa[..., part, :, :], w[:, part]).float()
                lanes = lanes + self.scale[:, g:g + 1] * ints
        for step in (8, 4, 2, 1):
            lanes = torch.cat([lanes[..., :step] + lanes[..., step:2 * step], lanes[..., step:]], dim=-1)
        y = s * lanes[..., 0]
        return y if self.bias is None else y + self.bias


def linear_names(model) -> list[str]:
    """The matrices the runtime runs as int8: every decoder Linear, then the LM head (named "lm_head")."""
    return models.prunable_names(model) + [LM_HEAD]


LM_HEAD = "lm_head"   # the output embeddings, whatever the model calls them


def _module(model, name):
    return model.get_output_embeddings() if name == LM_HEAD else model.get_submodule(name)


def _replace(model, name, new):
    if name == LM_HEAD:
        model.set_output_embeddings(new)
    else:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


class Detached(nn.Module):
    """Where a matrix was that now runs inside a fused module (decoder.py calls that one instead)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        raise RuntimeError(f"{self.name} runs fused with its siblings; call the fused module")


class Float32Linear(nn.Module):
    """The matrices' original weights in float32, torch's own matmul: the fp32 baseline."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _bias(mod, rows):
    b = getattr(mod, "bias", None)
    return torch.zeros(rows) if b is None else b.detach().float()


def convert(model, meta: dict | None = None, kernel: str = "auto", threads: int = 1, path: str | None = None,
            reference: str | None = None, fuse: list[list[str]] | None = None,
            materialize: Callable | None = None) -> dict:
    """Put the int8 matrices (linear_names) of `model` on the kernel, then make the rest float32.

    kernel: "auto" | "sparse" | "dense" (KERNEL_MODES). reference: None (the kernel), "exact" | "fp32"
    (FakeQuantLinear), "torch" (Float32Linear: no quantization). fuse: groups of matrices that read the
    same input (q/k/v, gate/up), each run as one matrix with their rows stacked; every matrix in exactly one
    group. The group modules are returned under "fused" ({tuple(names): module}) and the originals become
    Detached. Without fuse each matrix replaces its module in place. Matrices are converted group by group,
    so a bf16 model never exists in float32 whole.
    Returns {"layers": {name: sparsity, layout}, "bytes": totals of PackedLinear.nbytes(), "exact_grid":
    names read back exactly from their recorded grid, "fused": ...}.
    """
    if kernel not in KERNEL_MODES:
        raise ValueError(f"kernel must be one of {KERNEL_MODES}")
    names = linear_names(model)
    groups = fuse or [[n] for n in names]
    if sorted(n for g in groups for n in g) != sorted(names):
        raise ValueError("fuse must hold every matrix of linear_names(model) once")
    scales = recorded_scales(meta or {}, names[:-1])
    bits = recorded_bits(meta or {})
    if recorded_group_size(meta or {}) and bits > 4:
        raise UserError(f"sparse-cpu runs group-wise grids at 4 bits or fewer; this folder's is {bits}-bit "
                        "(prune with --wbits 4, or without --group-size)")
    layers, totals, exact, fused = {}, {}, [], {}
    for group in groups:
        if materialize is not None:
            materialize(group)
        mods = [_module(model, n) for n in group]
        if reference == "torch":
            w = torch.cat([models.weight_2d(m).detach().float() for m in mods])
            has_bias = any(getattr(m, "bias", None) is not None for m in mods)
            new = Float32Linear(w, torch.cat([_bias(m, models.weight_2d(m).shape[0]) for m in mods]) if has_bias
                                else None)
            totals["read"] = totals.get("read", 0) + 4 * (w.numel() + (w.shape[0] if has_bias else 0))
        else:
            four = [_is_int4(n, bits, scales) for n in group]
            if any(four) and not all(four):
                raise UserError(f"{', '.join(group)} run as one matrix but only some are on a 4-bit grid")
            four = all(four)
            parts = [(*int4_grid(models.weight_2d(m), scales[n]), True) if four else
                     int8_grid(models.weight_2d(m), scales.get(n)) for n, m in zip(group, mods)]
            exact += [n for n, p in zip(group, parts) if p[2]]
            q, s = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            has_bias = any(getattr(m, "bias", None) is not None for m in mods)
            bias = torch.cat([_bias(m, p[0].shape[0]) for m, p in zip(mods, parts)]).numpy() if has_bias else None
            sparsity = float(1 - np.count_nonzero(q) / q.size)
            if reference:
                new = FakeQuantLinear(q, s, bias, exact=reference == "exact")
                dense = True
            else:
                floor = MASK_MIN_SPARSITY_INT4 if four else MASK_MIN_SPARSITY
                dense = kernel == "dense" or (kernel == "auto" and sparsity < floor)
                packed = pack4(q, s, bias, dense=dense) if four else pack(q, s, bias, dense=dense)
                new = Int8Linear(packed, threads, path)
                for k, v in packed.nbytes().items():
                    totals[k] = totals.get(k, 0) + v
            for n, p in zip(group, parts):
                layers[n] = {"shape": list(p[0].shape), "sparsity": float(1 - np.count_nonzero(p[0]) / p[0].size),
                             "dense": dense, "group": len(group), "bits": 4 if four else 8}
        if fuse:
            fused[tuple(group)] = new
            for n in group:
                _replace(model, n, Detached(n))
        else:
            _replace(model, group[0], new)
        del mods
    model.float()
    return {"layers": layers, "bytes": totals, "exact_grid": exact, "fused": fused}


def _is_int4(name: str, bits: int | None, scales: dict) -> bool:
    """Whether matrix `name` runs int4: on a recorded grid of 4 bits or fewer with float16-valued scales."""
    return bool(bits and bits <= 4 and name in scales and half_exact(scales[name]))


def mixed_widths(groups: list[list[str]], meta: dict) -> bool:
    """Whether a fused group would mix int4 and int8 matrices (e.g. a 4-bit prune with --ignore q_proj)."""
    names = [n for g in groups for n in g]
    scales, bits = recorded_scales(meta or {}, names), recorded_bits(meta or {})
    return any(len({_is_int4(n, bits, scales) for n in g}) > 1 for g in groups)


def load_int8_model(spec, kernel: str = "auto", threads: int = 1, path: str | None = None,
                    reference: str | None = None, fuse: Callable | None = None,
                    stream: bool | None = None) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, summary) for a model folder, .gguf file or 'smollm2', converted by convert();
    fuse(model) gives its groups (or None).

    stream: read a safetensors folder's matrices from its shards group by group, each packed before the
    next is read (peak: the packed model + the float32 rest + one group), instead of loading the whole
    checkpoint first (which an 8B model's 16 GB plus its packed copy would not fit in 24 GiB). None:
    stream when checkpoints.streamable() says the folder is large. Both give the same packed bytes."""
    t = time.perf_counter()
    kind, where = models.resolve(spec)
    meta = read_meta(where) if kind == "folder" else {}
    if stream is None:
        stream = checkpoints.streamable(spec)
    materialize = None
    if stream:
        if kind != "folder" or not checkpoints.has_safetensors(where):
            raise UserError(f"a streamed load reads a local safetensors folder; {spec} is not one")
        model, materialize = _streamed_skeleton(where)
        tokenizer = models.folder_tokenizer(where)
    else:
        model, tokenizer = models.load_model(spec)
    groups = fuse(model) if fuse else None
    if groups and mixed_widths(groups, meta):   # int4 and int8 rows cannot share one packed matrix: run unfused
        groups = None
    summary = convert(model, meta, kernel, threads, path, reference, groups, materialize)
    unread = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta] if stream else []
    if unread:   # a tensor outside the matrices (a norm, the embedding) the shards did not hold
        raise UserError(f"{where}: no value for {unread[0]} in its shards")
    summary.update(load_s=time.perf_counter() - t, sparsity=meta.get("pruned_sparsity"), streamed=bool(stream))
    return model.eval(), tokenizer, summary


def _streamed_skeleton(folder) -> tuple[nn.Module, Callable]:
    """The model on meta with everything but its int8 matrices read (embeddings, norms, buffers), and the
    function that reads a group of matrices (convert's materialize)."""
    reader = checkpoints.ShardReader(folder)
    model = checkpoints.skeleton(folder, reader)
    names = checkpoints.checkpoint_names(model, reader)
    module_name = {id(m): n for n, m in model.named_modules()}
    owner = {n: module_name[id(_module(model, n))] for n in linear_names(model)}
    matrices = set(owner.values())
    checkpoints.load_tensors(model, reader, {m: c for m, c in names.items() if m.rpartition(".")[0] not in matrices})
    checkpoints.tie_missing(model)

    def materialize(group):
        mods = {owner[n] for n in group}
        wanted = {m: c for m, c in names.items() if m.rpartition(".")[0] in mods}
        checkpoints.load_tensors(model, reader, wanted)
        checkpoints.tie_missing(model)
        missing = [n for n in group if models.weight_2d(_module(model, n)).is_meta]
        if missing:
            raise UserError(f"{folder}: no weight for {missing[0]} in its shards")

    return model, materialize
