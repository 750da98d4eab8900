"""KV-cache ONNX export: one graph for the prompt (many tokens) and each decode step (one token).

The graph follows the names and cache layout of DeepSparse 1.8's text-generation pipeline.
With L = max_length (static: the runtime fixes it), n = tokens fed in this call, P = L - n:

  inputs   input_ids [B, n] int64
           attention_mask [B, L] int64    1 on valid cache slots; they are right-aligned
           positions [B, n] int64         absolute positions of the n new tokens
           causal_mask [B, 1, n, L] int64 1 where new token i may attend slot j
           past_key_values.{i}.key/.value [B, kv_heads, P, head_dim] float32
  outputs  logits [B, n, vocab]
           present.{i}.key/.value [B, kv_heads, L, head_dim] = concat(past, new) on the slot axis

Before the next call with n' tokens the runtime keeps the last L - n' slots of `present`
(the oldest, empty slots fall off the left). The cache has num_key_value_heads heads, so
grouped-query models keep their small cache; query heads share KV heads inside the graph.
"""

import time

import numpy as np
import torch
from torch import nn

from . import models
from .errors import UserError
from .onnx_export import match_modules, save_onnx, sparsity_summary, weight_sparsity
from .outputs import META_FILE, Timer, atomic_dir, library_versions, write_json

OPSET = 17
SUPPORTED = ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox")
INPUTS = ["input_ids", "attention_mask", "positions", "causal_mask"]


def cache_names(n_layers, prefix):
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


# --------------------------------------------------------------------------- attention helpers

def attend(q, k, v, bias, scale):
    """q [B, H, n, D]; k, v [B, KV, L, D]; bias [B, 1, n, L] additive. Returns [B, n, H*D].

    Query head h uses KV head h // (H/KV), as in transformers. Reshaping q instead of
    repeating k/v, and computing (k q^T)^T instead of q k^T, keeps the cache un-copied
    (DeepSparse would materialize a transposed cache on every decode step).
    """
    b, h, n, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, kv, -1, d)                               # [B, KV, rep*n, D]
    s = torch.matmul(k, q.transpose(2, 3)).transpose(2, 3) * scale  # no transpose of the cache
    s = s.reshape(b, kv, h // kv, n, -1) + bias.unsqueeze(1)  # [B, KV, rep, n, L]
    p = torch.softmax(s, dim=-1).reshape(b, kv, -1, s.shape[-1])
    o = torch.matmul(p, v).reshape(b, h, n, d)
    return o.transpose(1, 2).reshape(b, n, h * d)


def heads(x, n_heads, d):
    """[B, n, n_heads*d] -> [B, n_heads, n, d]"""
    return x.reshape(x.shape[0], x.shape[1], n_heads, d).transpose(1, 2)


def rotary(x, cos, sin, rot, partial):
    """Rotate the first `rot` dims of x [B, H, n, D]; with `partial` the rest pass through."""
    xr = x[..., :rot]
    half = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), dim=-1)
    out = xr * cos + half * sin
    return torch.cat((out, x[..., rot:]), dim=-1) if partial else out


def rope_tables(rotary_emb, positions):
    """cos, sin [B, 1, n, rot] from a transformers rotary module's inv_freq."""
    freqs = positions[..., None].float() * rotary_emb.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = getattr(rotary_emb, "attention_scaling", 1.0)
    return (emb.cos() * scaling).unsqueeze(1), (emb.sin() * scaling).unsqueeze(1)


# --------------------------------------------------------------------------- the wrapper

class KVCacheLM(nn.Module):
    """Runs the HF model's own layers with an explicit cache; returns plain tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.arch = models.model_type(model)
        if self.arch not in SUPPORTED:
            raise UserError(f"KV-cache export does not support architecture '{self.arch}' "
                            f"(supported: {', '.join(SUPPORTED)})")
        self.layers = models.decoder_layers(model)
        c = model.config
        self.n_heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        rotary_emb = getattr(getattr(model, "model", getattr(model, "gpt_neox", None)), "rotary_emb", None)
        self.rot = 2 * rotary_emb.inv_freq.numel() if rotary_emb is not None else 0  # rotated dims

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        allowed = causal_mask * attention_mask[:, None, None, :]
        bias = (1.0 - allowed.float()) * torch.finfo(torch.float32).min
        h, ctx = self.embed(input_ids, positions)
        presents = []
        for i, layer in enumerate(self.layers):
            h, k, v = self.block(layer, h, bias, past[2 * i], past[2 * i + 1], ctx)
            presents += [k, v]
        return (self.head(h), *presents)

    # -- per architecture: embed -> (hidden, context), block, head

    def embed(self, ids, pos):
        m, a = self.model, self.arch
        if a in ("llama", "mistral", "qwen2"):
            return m.model.embed_tokens(ids), self.rope(m.model.rotary_emb, pos)
        if a == "gpt_neox":
            return m.gpt_neox.embed_in(ids), self.rope(m.gpt_neox.rotary_emb, pos)
        if a == "gpt2":
            return m.transformer.wte(ids) + m.transformer.wpe(pos), None
        d = m.model.decoder  # opt: learned positions with an offset of 2
        x = d.embed_tokens(ids)
        if d.project_in is not None:
            x = d.project_in(x)
        return x + d.embed_positions.weight[pos + d.embed_positions.offset], None

    def rope(self, rotary_emb, pos):
        return (*rope_tables(rotary_emb, pos), self.rot, self.rot < self.head_dim)

    def block(self, layer, h, bias, pk, pv, ctx):
        a, H, KV, D = self.arch, self.n_heads, self.kv_heads, self.head_dim
        if a in ("llama", "mistral", "qwen2"):
            at = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = heads(at.q_proj(x), H, D), heads(at.k_proj(x), KV, D), heads(at.v_proj(x), KV, D)
            q, k = rotary(q, *ctx), rotary(k, *ctx)
            k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
            h = h + at.o_proj(attend(q, k, v, bias, at.scaling))
            return h + layer.mlp(layer.post_attention_layernorm(h)), k, v
        if a == "gpt_neox":
            at = layer.attention
            qkv = at.query_key_value(layer.input_layernorm(h))
            qkv = qkv.reshape(h.shape[0], h.shape[1], H, 3 * D).transpose(1, 2)
            q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
            q, k = rotary(q, *ctx), rotary(k, *ctx)
            k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
            o = at.dense(attend(q, k, v, bias, at.scaling))
            if layer.use_parallel_residual:
                return h + o + layer.mlp(layer.post_attention_layernorm(h)), k, v
            h = h + o
            return h + layer.mlp(layer.post_attention_layernorm(h)), k, v
        if a == "gpt2":
            at = layer.attn
            q, k, v = at.c_attn(layer.ln_1(h)).split(H * D, dim=2)
            q, k, v = heads(q, H, D), heads(k, H, D), heads(v, H, D)
            k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
            h = h + at.c_proj(attend(q, k, v, bias, at.scaling))
            return h + layer.mlp(layer.ln_2(h)), k, v
        # opt: pre- or post-LayerNorm (opt-350m is post)
        at, pre = layer.self_attn, layer.do_layer_norm_before
        x = layer.self_attn_layer_norm(h) if pre else h
        q, k, v = heads(at.q_proj(x), H, D), heads(at.k_proj(x), H, D), heads(at.v_proj(x), H, D)
        k, v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        h = h + at.out_proj(attend(q, k, v, bias, at.scaling))
        if not pre:
            h = layer.self_attn_layer_norm(h)
        x = layer.final_layer_norm(h) if pre else h
        h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
        if not pre:
            h = layer.final_layer_norm(h)
        return h, k, v

    def head(self, h):
        m, a = self.model, self.arch
        if a in ("llama", "mistral", "qwen2"):
            h = m.model.norm(h)
        elif a == "gpt_neox":
            h = m.gpt_neox.final_layer_norm(h)
        elif a == "gpt2":
            h = m.transformer.ln_f(h)
        else:
            d = m.model.decoder
            if d.final_layer_norm is not None:
                h = d.final_layer_norm(h)
            if d.project_out is not None:
                h = d.project_out(h)
        return m.get_output_embeddings()(h)


def check_supported(model, max_length):
    """UserError for architectures or settings the wrapper does not reproduce exactly."""
    c, arch = model.config, models.model_type(model)
    if arch not in SUPPORTED:
        raise UserError(f"KV-cache export does not support architecture '{arch}' "
                        f"(supported: {', '.join(SUPPORTED)})")
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        raise UserError(f"KV-cache export does not support rope_type '{rope}'")
    sliding = getattr(c, "sliding_window", None)
    if arch == "qwen2" and "sliding_attention" not in (getattr(c, "layer_types", None) or []):
        sliding = None
    if sliding and max_length > sliding:
        raise UserError(f"--max-length {max_length} exceeds the model's sliding window ({sliding}); "
                        f"use --max-length {sliding} or less")
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    if arch in ("opt", "gpt2") and limit and max_length > limit:
        raise UserError(f"--max-length {max_length} exceeds the model's {limit} learned positions")


def cache_spec(model):
    """(layers, kv_heads, head_dim) of the cache tensors."""
    c = model.config
    n_heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or n_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return len(models.decoder_layers(model)), kv, d


# --------------------------------------------------------------------------- runtime-side inputs

def step_feed(ids, processed, max_length):
    """The non-cache inputs for feeding `ids` [B, n] when `processed` tokens are in the cache."""
    ids = np.asarray(ids, dtype=np.int64)
    b, n = ids.shape
    total = processed + n
    if total > max_length:
        raise UserError(f"{total} tokens do not fit the cache of {max_length} tokens (--max-length)")
    attn = np.zeros((b, max_length), np.int64)
    attn[:, max_length - total:] = 1
    causal = np.ones((b, 1, n, max_length), np.int64)
    causal[..., max_length - n:] = np.tril(np.ones((n, n), np.int64))
    causal *= attn[:, None, None, :]
    positions = np.broadcast_to(np.arange(processed, total, dtype=np.int64), (b, n)).copy()
    return {"input_ids": ids, "attention_mask": attn, "positions": positions, "causal_mask": causal}


def empty_cache(n_layers, batch, kv_heads, slots, head_dim):
    return [np.zeros((batch, kv_heads, slots, head_dim), np.float32) for _ in range(2 * n_layers)]


def keep_last(present, slots):
    """The last `slots` cache slots of each present tensor: the past for the next call."""
    return [np.ascontiguousarray(p[:, :, p.shape[2] - slots:]) for p in present]


# --------------------------------------------------------------------------- export

def export_kv_onnx(model_spec, out, max_length=2048, force=False, log=print):
    """Export MODEL as a KV-cache ONNX deployment folder at `out`, atomically. Returns the metadata."""
    if max_length < 2:
        raise UserError("--max-length must be at least 2")
    with atomic_dir(out, force) as tmp:
        with Timer() as t_load:
            model, tokenizer = models.load_model(model_spec)
        model = model.float().eval()
        check_supported(model, max_length)
        n_layers, kv_heads, head_dim = cache_spec(model)
        with Timer() as t_export:
            _export(model, tmp / "model.onnx")
        weights = weight_sparsity(tmp / "model.onnx")  # counted in the file, as the plain export does
        problems = match_modules(weights, tmp / "model.onnx", model)
        if problems:
            raise UserError(f"the exported weights do not match the model: {problems[0]}")
        summary = sparsity_summary(weights)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        meta = {
            "kind": "onnx-kv-cache",
            "format": "onnx",
            "source_model": str(model_spec),
            "architecture": models.model_type(model),
            "opset": OPSET,
            "max_length": max_length,
            "logits": "all",
            "cache": {
                "layers": n_layers, "kv_heads": kv_heads, "query_heads": model.config.num_attention_heads,
                "head_dim": head_dim, "dtype": "float32",
                "inputs": INPUTS + ["past_key_values.{i}.key", "past_key_values.{i}.value"],
                "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
                "layout": (
                    "L = max_length, n = tokens in this call. attention_mask [B, L]: 1 on valid slots, "
                    "right-aligned. positions [B, n]: absolute positions. causal_mask [B, 1, n, L]: 1 where "
                    "token i may attend slot j. past_key_values.i.* [B, kv_heads, L - n, head_dim]; "
                    "present.i.* [B, kv_heads, L, head_dim] = concat(past, new); keep its last L - n' slots "
                    "for the next call with n' tokens. Same layout as DeepSparse 1.8 text generation."),
            },
            **summary,
            "weights": weights,
            "timing": {"load_s": t_load.wall, "export_s": t_export.wall},
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / META_FILE, meta)
    log(f"wrote KV-cache ONNX to {out}: max length {max_length}, cache {n_layers} layers x {kv_heads} KV heads "
        f"x {head_dim}; {summary['prunable_matrices']} prunable matrices at {summary['prunable_sparsity']:.1%} "
        f"sparsity (counted in the ONNX file)")
    return meta


@torch.no_grad()
def _export(model, path):
    import onnx

    wrapper = KVCacheLM(model).eval()
    n_layers, kv, d = cache_spec(model)
    n, past = 3, 5  # tracing shapes; every axis below is dynamic
    feed = step_feed(np.arange(1, n + 1)[None], 2, n + past)
    args = [torch.from_numpy(feed[k]) for k in INPUTS]
    args += [torch.randn(1, kv, past, d) for _ in range(2 * n_layers)]
    past_names, present_names = cache_names(n_layers, "past_key_values"), cache_names(n_layers, "present")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "positions": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"},
            "causal_mask": {0: "batch", 2: "seq", 3: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({p: {0: "batch", 2: "past"} for p in past_names})
    axes.update({p: {0: "batch", 2: "total"} for p in present_names})
    scratch = path.parent / "_export"
    scratch.mkdir()
    torch.onnx.export(wrapper, tuple(args), str(scratch / path.name), dynamo=False, opset_version=OPSET,
                      input_names=INPUTS + past_names, output_names=["logits"] + present_names,
                      dynamic_axes=axes, do_constant_folding=True)
    save_onnx(onnx.load(str(scratch / path.name)), path)  # external data past 2 GB
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
