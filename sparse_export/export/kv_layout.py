"""The KV-cache graph's interface: input and cache names, the inputs for each call, and the cache kept
between calls. The exporter is onnx_kv.py; runtimes/generate.py feeds the graph with these.

One graph serves the prompt (many tokens) and each decode step (one token).

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

import numpy as np

from .. import archs, models
from ..errors import UserError

KV_INPUTS = ["input_ids", "attention_mask", "positions", "causal_mask"]


def cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def cache_spec(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the cache tensors."""
    _, kv, d = archs.arch_of(model).cache_shape(model.config)
    return len(models.decoder_layers(model)), kv, d


def step_feed(ids, processed: int, max_length: int) -> dict:
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


def empty_cache(n_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int) -> list:
    return [np.zeros((batch, kv_heads, slots, head_dim), np.float32) for _ in range(2 * n_layers)]


def keep_last(present, slots: int) -> list:
    """The last `slots` cache slots of each present tensor: the past for the next call."""
    return [np.ascontiguousarray(p[:, :, p.shape[2] - slots:]) for p in present]


