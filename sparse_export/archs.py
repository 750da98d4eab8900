"""What each supported architecture needs, in one registry: one class per family.

An entry says where the decoder layers are, which attention module computes the standard
softmax(q k^T s + mask) v (the INT8 export quantizes its score matmul), the layer widths (to size
the pruning activations), the cache shape, and, for families the KV-cache export covers, how one
decoder block runs with an explicit cache. Supporting a new family is one subclass here; families
that differ from a supported one only in details subclass it (Mistral and Qwen2 are Llamas).
"""

import torch

from .attention import attend, heads, rope_tables, rotary
from .errors import UserError


class Arch:
    """Base entry. Subclasses set the class attributes and, when kv_cache, embed/block/head."""

    model_type: str = ""
    layers: str = ""                      # attribute path of the list of decoder layers
    attention: str | None = None          # standard-attention module inside a layer (INT8 score matmul)
    kv_cache: bool = False                # the KV-cache export reproduces this family exactly
    learned_positions: bool = False       # positions are an embedding table: the cache cannot pass it
    inner_keys: tuple = ("intermediate_size",)

    # -- shapes

    def hidden_size(self, config) -> int:
        return getattr(config, "hidden_size", None) or getattr(config, "n_embd")

    def inner_size(self, config) -> int:
        for key in self.inner_keys:
            if getattr(config, key, None):
                return getattr(config, key)
        return 4 * self.hidden_size(config)

    def cache_shape(self, config) -> tuple[int, int, int]:
        """(query heads, KV heads, head dim)."""
        n_heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or n_heads
        return n_heads, kv, getattr(config, "head_dim", None) or config.hidden_size // n_heads

    def sliding_window(self, config) -> int | None:
        return getattr(config, "sliding_window", None)

    def smooth_pairs(self, layer) -> list[tuple[str, tuple[str, ...]]]:
        """SmoothQuant folds (pruning/smooth.py) in one decoder layer: (producer, consumers), names inside
        the layer. The producer's output reaches the consumers' inputs channel for channel and goes nowhere
        else, so a per-channel 1/s folds into it exactly: a norm (weight and bias) or a Linear (its output
        rows; attention or an elementwise gate between them is linear in it, as in v_proj -> o_proj)."""
        return []

    # -- where things are

    def decoder_layers(self, model):
        obj = model
        for part in self.layers.split("."):
            obj = getattr(obj, part)
        return obj

    def attention_names(self, model) -> list[str]:
        if self.attention is None:
            return []
        return [f"{self.layers}.{i}.{self.attention}" for i in range(len(self.decoder_layers(model)))]

    # -- the KV-cache graph: embed -> (hidden, context), block per layer, head

    def rotary_emb(self, model):
        return None

    def rope(self, model, pos):
        """The rotary context of positions `pos` for rotary(), from the model's own rotary module."""
        return rope_context(self.rotary_emb(model), pos, self.cache_shape(model.config)[2])

    def embed(self, model, ids, pos):
        raise NotImplementedError

    def block(self, layer, h, bias, pk, pv, ctx, dims):
        raise NotImplementedError

    def head(self, model, h):
        raise NotImplementedError


def rope_context(rotary_emb, pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(cos, sin, rotated dims, partial) for rotary() from the model's rotary module."""
    rot = 2 * rotary_emb.inv_freq.numel()
    return (*rope_tables(rotary_emb, pos), rot, rot < head_dim)


def _cat_cache(pk, pv, k, v):
    return torch.cat((pk, k), 2), torch.cat((pv, v), 2)


class Llama(Arch):
    model_type = "llama"
    layers = "model.layers"
    attention = "self_attn"
    kv_cache = True

    def rotary_emb(self, model):
        return model.model.rotary_emb

    def smooth_pairs(self, layer):
        return [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                ("self_attn.v_proj", ("self_attn.o_proj",)),
                ("mlp.up_proj", ("mlp.down_proj",))]          # down(act(gate(x)) * up(x))

    def embed(self, model, ids, pos):
        return model.model.embed_tokens(ids), self.rope(model, pos)

    def block(self, layer, h, bias, pk, pv, ctx, dims):
        H, KV, D = dims
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = heads(at.q_proj(x), H, D), heads(at.k_proj(x), KV, D), heads(at.v_proj(x), KV, D)
        q, k = rotary(q, *ctx), rotary(k, *ctx)
        k, v = _cat_cache(pk, pv, k, v)
        h = h + at.o_proj(attend(q, k, v, bias, at.scaling))
        return h + layer.mlp(layer.post_attention_layernorm(h)), k, v

    def head(self, model, h):
        return model.get_output_embeddings()(model.model.norm(h))


class Mistral(Llama):
    model_type = "mistral"


class Qwen2(Llama):
    model_type = "qwen2"

    def sliding_window(self, config):
        # Qwen2 configs carry a window that only applies when a layer is marked sliding
        if "sliding_attention" not in (getattr(config, "layer_types", None) or []):
            return None
        return getattr(config, "sliding_window", None)


class Opt(Arch):
    model_type = "opt"
    layers = "model.decoder.layers"
    attention = "self_attn"
    kv_cache = True
    learned_positions = True
    inner_keys = ("ffn_dim",)

    def smooth_pairs(self, layer):
        values = [("self_attn.v_proj", ("self_attn.out_proj",))]
        if not layer.do_layer_norm_before:   # post-LayerNorm (opt-350m): the norms also feed the residual
            return values
        return [("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("final_layer_norm", ("fc1",))] + values

    def embed(self, model, ids, pos):
        d = model.model.decoder  # learned positions with an offset of 2
        x = d.embed_tokens(ids)
        if d.project_in is not None:
            x = d.project_in(x)
        return x + d.embed_positions.weight[pos + d.embed_positions.offset], None

    def block(self, layer, h, bias, pk, pv, ctx, dims):
        H, _, D = dims
        at, pre = layer.self_attn, layer.do_layer_norm_before  # pre- or post-LayerNorm (opt-350m: post)
        x = layer.self_attn_layer_norm(h) if pre else h
        q, k, v = heads(at.q_proj(x), H, D), heads(at.k_proj(x), H, D), heads(at.v_proj(x), H, D)
        k, v = _cat_cache(pk, pv, k, v)
        h = h + at.out_proj(attend(q, k, v, bias, at.scaling))
        if not pre:
            h = layer.self_attn_layer_norm(h)
        x = layer.final_layer_norm(h) if pre else h
        h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
        if not pre:
            h = layer.final_layer_norm(h)
        return h, k, v

    def head(self, model, h):
        d = model.model.decoder
        if d.final_layer_norm is not None:
            h = d.final_layer_norm(h)
        if d.project_out is not None:
            h = d.project_out(h)
        return model.get_output_embeddings()(h)


class Gpt2(Arch):
    model_type = "gpt2"
    layers = "transformer.h"
    kv_cache = True
    learned_positions = True
    inner_keys = ("n_inner",)

    def smooth_pairs(self, layer):
        return [("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))]

    def embed(self, model, ids, pos):
        return model.transformer.wte(ids) + model.transformer.wpe(pos), None

    def block(self, layer, h, bias, pk, pv, ctx, dims):
        H, _, D = dims
        at = layer.attn
        q, k, v = at.c_attn(layer.ln_1(h)).split(H * D, dim=2)
        q, k, v = heads(q, H, D), heads(k, H, D), heads(v, H, D)
        k, v = _cat_cache(pk, pv, k, v)
        h = h + at.c_proj(attend(q, k, v, bias, at.scaling))
        return h + layer.mlp(layer.ln_2(h)), k, v

    def head(self, model, h):
        return model.get_output_embeddings()(model.transformer.ln_f(h))


class GptNeox(Arch):
    model_type = "gpt_neox"
    layers = "gpt_neox.layers"
    kv_cache = True

    def rotary_emb(self, model):
        return model.gpt_neox.rotary_emb

    def smooth_pairs(self, layer):
        return [("input_layernorm", ("attention.query_key_value",)),
                ("post_attention_layernorm", ("mlp.dense_h_to_4h",))]

    def embed(self, model, ids, pos):
        return model.gpt_neox.embed_in(ids), self.rope(model, pos)

    def block(self, layer, h, bias, pk, pv, ctx, dims):
        H, _, D = dims
        at = layer.attention
        qkv = at.query_key_value(layer.input_layernorm(h))
        qkv = qkv.reshape(h.shape[0], h.shape[1], H, 3 * D).transpose(1, 2)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        q, k = rotary(q, *ctx), rotary(k, *ctx)
        k, v = _cat_cache(pk, pv, k, v)
        o = at.dense(attend(q, k, v, bias, at.scaling))
        if layer.use_parallel_residual:
            return h + o + layer.mlp(layer.post_attention_layernorm(h)), k, v
        h = h + o
        return h + layer.mlp(layer.post_attention_layernorm(h)), k, v

    def head(self, model, h):
        return model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h))


class Bloom(Arch):
    model_type = "bloom"
    layers = "transformer.h"

    def smooth_pairs(self, layer):
        if layer.apply_residual_connection_post_layernorm:   # the norms also feed the residual
            return []
        return [("input_layernorm", ("self_attention.query_key_value",)),
                ("post_attention_layernorm", ("mlp.dense_h_to_4h",))]


ARCHS = {cls.model_type: cls() for cls in (Llama, Mistral, Qwen2, Opt, Gpt2, GptNeox, Bloom)}
KV_CACHE = tuple(name for name, a in ARCHS.items() if a.kv_cache)
STANDARD_ATTENTION = tuple(name for name, a in ARCHS.items() if a.attention)


def model_type(model) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def arch_of_layer(layer) -> Arch:
    """The registry entry of a decoder layer, from its transformers module (models.<type>.modeling_<type>)."""
    name = type(layer).__module__.rpartition("modeling_")[2]
    if name not in ARCHS:
        raise UserError(f"unsupported architecture '{name}' (supported: {', '.join(ARCHS)})")
    return ARCHS[name]


def arch_of(model) -> Arch:
    """The registry entry of a model; UserError for an unsupported architecture."""
    name = model_type(model)
    if name not in ARCHS:
        raise UserError(f"unsupported architecture '{name}' (supported: {', '.join(ARCHS)})")
    return ARCHS[name]
