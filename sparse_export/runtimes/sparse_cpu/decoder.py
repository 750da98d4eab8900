"""A lean decode loop for the Llama family (llama, mistral, qwen2): the model's own embedding, norms,
rotary module and activation, with

- q/k/v and gate/up each run as one matrix (their rows stacked: one kernel call instead of three or two;
  the activations are quantized once per token either way, so the numbers are the same),
- a preallocated KV cache written in place (transformers' DynamicCache concatenates the whole cache on
  every step, which on SmolLM2 moves about a tenth as many bytes as the int8 weights),
- torch's scaled_dot_product_attention.

At batch 1 a small model's decode step is mostly Python and dispatch overhead outside the matmuls
(transformers' generic forward costs SmolLM2 about as much as its int8 weights); this loop keeps ~20 torch
ops per layer. Other architectures run transformers' forward with the kernel modules in place.
"""

import torch
import torch.nn.functional as F

from ... import archs
from ...attention import heads, rotary
from .kernel import NativeStep, decode_batch
from .model import Int8Linear

LEAN_ARCHS = ("llama", "mistral", "qwen2")


def lean_supported(model) -> bool:
    return archs.model_type(model) in LEAN_ARCHS


def lean_groups(model) -> list[list[str]]:
    """The matrices run together: per layer q+k+v, o, gate+up, down; then the LM head."""
    prefix = archs.arch_of(model).layers
    out = []
    for i in range(len(archs.arch_of(model).decoder_layers(model))):
        at, mlp = f"{prefix}.{i}.self_attn", f"{prefix}.{i}.mlp"
        out += [[f"{at}.q_proj", f"{at}.k_proj", f"{at}.v_proj"], [f"{at}.o_proj"],
                [f"{mlp}.gate_proj", f"{mlp}.up_proj"], [f"{mlp}.down_proj"]]
    return out + [["lm_head"]]


class LeanCache:
    """Keys and values of every layer, [1, kv_heads, capacity, head_dim], filled up to `length`;
    the capacity doubles when a call needs more."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 512):
        self.length, self.capacity = 0, capacity
        self.k = [torch.zeros(1, kv_heads, capacity, head_dim) for _ in range(layers)]
        self.v = [torch.zeros(1, kv_heads, capacity, head_dim) for _ in range(layers)]

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        while self.capacity < n:
            self.capacity *= 2
        grow = (lambda t: torch.cat([t, torch.zeros(*t.shape[:2], self.capacity - t.shape[2], t.shape[3])], 2))
        self.k, self.v = [grow(t) for t in self.k], [grow(t) for t in self.v]

    def get_seq_length(self) -> int:
        return self.length


class LeanDecoder:
    """One forward step over n new tokens with a LeanCache: (ids [1, n], cache) -> logits [1, 1, vocab] of
    the last token. `fused`: {tuple(names): module} from model.convert(fuse=lean_groups(model)).

    native: a one-token step runs whole in C++ (kernel.NativeStep: one call per token instead of ~20 torch
    ops per layer) when every matrix is on the kernel and the layers are the plain Llama form (RMSNorm,
    SiLU gate, full rotary); prompts, and models that are not, run the torch loop below. The two compute
    the same operations in a different float order: logits agree to ~1e-6 of their range."""

    def __init__(self, model, fused: dict, native: bool = True):
        self.model, self.arch = model, archs.arch_of(model)
        cfg = model.config
        self.H, self.KV, self.D = self.arch.cache_shape(cfg)
        by_first = {names[0]: m for names, m in fused.items()}
        prefix = self.arch.layers
        self.layers = []
        for i, layer in enumerate(self.arch.decoder_layers(model)):
            at, mlp = f"{prefix}.{i}.self_attn", f"{prefix}.{i}.mlp"
            self.layers.append((layer.input_layernorm, by_first[f"{at}.q_proj"], by_first[f"{at}.o_proj"],
                                layer.post_attention_layernorm, by_first[f"{mlp}.gate_proj"],
                                by_first[f"{mlp}.down_proj"], layer.mlp.act_fn, layer.self_attn.scaling))
        self.inner = self.arch.inner_size(cfg)
        self.head = by_first["lm_head"]
        self.window = self.arch.sliding_window(cfg)
        self.native = native and self._native_supported()

    def _native_supported(self) -> bool:
        cfg = self.model.config
        mats = [m for layer in self.layers for m in (layer[1], layer[2], layer[4], layer[5])] + [self.head]
        norms = [n for layer in self.layers for n in (layer[0], layer[3])] + [self.model.model.norm]
        _, _, rot, partial = self.arch.rope(self.model, torch.zeros(1, 1, dtype=torch.long))
        return (all(isinstance(m, Int8Linear) for m in mats) and getattr(cfg, "hidden_act", None) == "silu"
                and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon")
                        and getattr(n, "bias", None) is None for n in norms)
                and len({n.variance_epsilon for n in norms}) == 1 and not partial and self.H % self.KV == 0
                and len({layer[7] for layer in self.layers}) == 1)

    def _native_step(self, cache: "LeanCache") -> NativeStep:
        """The C++ step bound to this cache's tensors (rebuilt when the cache grows)."""
        key = (cache.capacity, cache.k[0].data_ptr())
        if getattr(cache, "native", (None,))[0] != key:
            if not all(t.is_contiguous() for t in cache.k + cache.v):   # C++ reads [kv_heads][capacity][dim]
                cache.k, cache.v = [t.contiguous() for t in cache.k], [t.contiguous() for t in cache.v]
                key = (cache.capacity, cache.k[0].data_ptr())
            w = (lambda n: n.weight.detach().float().contiguous())
            layers = [(w(n1), w(n2), qkv.kernel, o.kernel, gu.kernel, down.kernel, cache.k[i], cache.v[i])
                      for i, (n1, qkv, o, n2, gu, down, _, _) in enumerate(self.layers)]
            dims = {"hidden": self.model.config.hidden_size, "heads": self.H, "kv_heads": self.KV,
                    "head_dim": self.D, "inner": self.inner, "capacity": cache.capacity,
                    "eps": float(self.layers[0][0].variance_epsilon), "scaling": float(self.layers[0][7])}
            cache.native = (key, NativeStep(layers, w(self.model.model.norm), self.head.kernel, dims))
        return cache.native[1]

    def new_cache(self) -> LeanCache:
        return LeanCache(len(self.layers), self.KV, self.D)

    def __call__(self, ids: torch.Tensor, cache: LeanCache) -> torch.Tensor:
        n, p0 = ids.shape[1], cache.length
        total = p0 + n
        if self.window and total > self.window:
            raise ValueError(f"{total} tokens exceed the sliding window ({self.window}) the lean loop handles")
        cache.reserve(total)
        pos = torch.arange(p0, total)[None]
        h = self.model.model.embed_tokens(ids)
        cos, sin, rot, partial = self.arch.rope(self.model, pos)
        if self.native and n == 1:
            step = self._native_step(cache)
            logits = step(h.reshape(-1).float().contiguous(), p0, cos.reshape(-1).contiguous(),
                          sin.reshape(-1).contiguous(), self.head.threads, self.head.path)
            cache.length = total
            return logits.view(1, 1, -1)
        # n == 1 sees every cached position; a prompt needs the causal mask (offset by p0)
        mask = None if n == 1 else torch.ones(n, total, dtype=torch.bool).tril(p0)
        H, KV, D = self.H, self.KV, self.D
        for i, (norm1, qkv, o, norm2, gate_up, down, act, scaling) in enumerate(self.layers):
            q, k, v = qkv(norm1(h)).split([H * D, KV * D, KV * D], dim=-1)
            q, k = rotary(heads(q, H, D), cos, sin, rot, partial), rotary(heads(k, KV, D), cos, sin, rot, partial)
            cache.k[i][:, :, p0:total] = k
            cache.v[i][:, :, p0:total] = heads(v, KV, D)
            a = F.scaled_dot_product_attention(q, cache.k[i][:, :, :total], cache.v[i][:, :, :total], attn_mask=mask,
                                               scale=scaling, enable_gqa=KV != H)
            h = h + o(a.transpose(1, 2).reshape(1, n, H * D))
            g, u = gate_up(norm2(h)).split([self.inner, self.inner], dim=-1)
            h = h + down(act(g) * u)
        cache.length = total
        return self.head(self.model.model.norm(h[:, -1:]))

    def step_batch(self, tokens: list[int], caches: list[LeanCache]) -> torch.Tensor:
        """One decode step of B sequences as one native call: token b after caches[b]'s tokens. Returns the
        logits [B, vocab]; row b is bit for bit what self([[tokens[b]]], caches[b]) gives. Needs the native
        step (self.native)."""
        if not self.native:
            raise ValueError("a batched step needs the native decode step")
        lengths = [c.length for c in caches]
        for c, n in zip(caches, lengths):
            if self.window and n + 1 > self.window:
                raise ValueError(f"{n + 1} tokens exceed the sliding window ({self.window}) the lean loop handles")
            c.reserve(n + 1)
        steps = [self._native_step(c) for c in caches]
        pos = torch.tensor([lengths])
        h = self.model.model.embed_tokens(torch.tensor([tokens]))
        cos, sin, _, _ = self.arch.rope(self.model, pos)
        B = len(caches)
        logits = decode_batch(steps, h.reshape(B, -1).float().contiguous(), lengths,
                              cos.reshape(B, -1).float().contiguous(), sin.reshape(B, -1).float().contiguous(),
                              self.head.threads, self.head.path)
        for c, n in zip(caches, lengths):
            c.length = n + 1
        return logits
