"""Attention as the KV-cache ONNX graph computes it: heads, rotary embeddings, grouped-query attention.

Plain tensor functions, shared by every architecture's KV-cache block in archs.py.
"""

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
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


def heads(x: torch.Tensor, n_heads: int, d: int) -> torch.Tensor:
    """[B, n, n_heads*d] -> [B, n_heads, n, d]"""
    return x.reshape(x.shape[0], x.shape[1], n_heads, d).transpose(1, 2)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, partial: bool) -> torch.Tensor:
    """Rotate the first `rot` dims of x [B, H, n, D]; with `partial` the rest pass through."""
    xr = x[..., :rot]
    half = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), dim=-1)
    out = xr * cos + half * sin
    return torch.cat((out, x[..., rot:]), dim=-1) if partial else out


def rope_tables(rotary_emb, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, n, rot] from a transformers rotary module's inv_freq."""
    freqs = positions[..., None].float() * rotary_emb.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = getattr(rotary_emb, "attention_scaling", 1.0)
    return (emb.cos() * scaling).unsqueeze(1), (emb.sin() * scaling).unsqueeze(1)
