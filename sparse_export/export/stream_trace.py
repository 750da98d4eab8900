"""The template of a streamed export: the model traced once with a single decoder layer, by the same code
the in-memory exports run (onnx_plain.write_onnx, onnx_kv.trace_kv), and each of its weight
initializers tied to the model tensor it holds.

The one-layer model has the real hidden size and heads, and a small vocabulary and MLP width (the
initializers that depend on those get their real shapes when the weights are written). Every parameter
gets distinctive random values before the trace, so an initializer is identified by its contents: it is a parameter,
or a parameter transposed (a Linear weight pre-transposed for MatMul by constant folding), possibly
reshaped. Initializers that match no parameter are constants of the graph (shapes, scales, rotary
frequencies computed from the config) and are kept as traced.
"""

import copy
import hashlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import archs, models
from ..errors import UserError
from .graph import load_onnx
from .kv_layout import cache_names
from .layer_graph import MarkedArch, Template, marked_layer, split

TRACE_VOCAB = 131   # vocabulary of the one-layer model (an odd size no other dimension is likely to have)
TRACE_INNER = 40    # MLP width of the one-layer model: only weight shapes depend on it


@dataclass
class Source:
    """The model tensor an initializer holds: `param` (a name in the one-layer model), maybe transposed."""

    param: str
    transposed: bool


def homogeneous(skel) -> None:
    """UserError unless every decoder layer has layer 0's tensors, shapes and kind (what repeating needs)."""
    arch = archs.arch_of(skel)
    layers = arch.decoder_layers(skel)
    first = [(n, tuple(p.shape)) for n, p in layers[0].state_dict(keep_vars=True).items()]
    for i, layer in enumerate(layers):
        if [(n, tuple(p.shape)) for n, p in layer.state_dict(keep_vars=True).items()] != first:
            raise UserError(f"decoder layer {i} differs from layer 0; the streamed export repeats one layer "
                            "(use --no-stream)")
    kinds = set(getattr(skel.config, "layer_types", None) or [])
    if len(kinds) > 1:
        raise UserError(f"the decoder layers are of several kinds ({', '.join(sorted(kinds))}); the streamed "
                        "export repeats one layer (use --no-stream)")


def one_layer_config(config) -> object:
    """The config with one decoder layer and (when larger) a TRACE_VOCAB-token vocabulary and TRACE_INNER
    wide MLP: the trace's weights stay small, its graph is the real one (weights are sized when written).
    The MLP keeps its width where a layer is not made of nn.Linear (GPT-2's Conv1D writes its output width
    into the graph)."""
    from transformers import AutoModelForCausalLM

    c = copy.deepcopy(config)
    c.num_hidden_layers = 1
    arch = archs.ARCHS[c.model_type]
    narrow = copy.deepcopy(c)
    for key in arch.inner_keys:
        if hasattr(narrow, key) and (getattr(narrow, key) or 4 * arch.hidden_size(narrow)) > TRACE_INNER:
            setattr(narrow, key, TRACE_INNER)
    with torch.device("meta"):
        layer = arch.decoder_layers(AutoModelForCausalLM.from_config(narrow))[0]
    if all(isinstance(m, torch.nn.Linear) for m in layer.modules() if models.prunable(m)):
        c = narrow
    if getattr(c, "layer_types", None):
        c.layer_types = list(c.layer_types[:1])
    if c.vocab_size > TRACE_VOCAB:
        c.vocab_size = TRACE_VOCAB
        c.pad_token_id = None          # an embedding's padding row only matters for training
    return c


def one_layer_model(config, seed: int = 0) -> torch.nn.Module:
    """A float32 causal LM with one decoder layer and distinctive random values in every parameter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(one_layer_config(config), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():       # a tied parameter once
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _key(arr) -> str:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def identify(proto, model) -> dict[str, Source]:
    """{initializer: Source} for the initializers of `proto` that hold a parameter of `model` (by value)."""
    from onnx import TensorProto, numpy_helper

    table = {}
    for name, p in model.named_parameters():
        w = p.detach().numpy()
        table.setdefault(_key(w), Source(name, False))
        if w.ndim == 2:
            table.setdefault(_key(w.T), Source(name, True))
    found = {}
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1:
            src = table.get(_key(numpy_helper.to_array(t)))
            if src is not None:
                found[t.name] = src
    return found


def kv_names() -> dict:
    """Layer 0's cache inputs and outputs -> layer i's name (kv_layout.cache_names)."""
    out = {}
    for prefix in ("past_key_values", "present"):
        for kv, name in zip(("key", "value"), cache_names(1, prefix)):
            out[name] = (lambda p, k: lambda i: f"{p}.{i}.{k}")(prefix, kv)
    return out


def trace_template(config, kind: str, logits: str = "last", seqlen: int = 16) -> tuple[Template, dict, dict]:
    """Trace the one-layer model of `config` (kind: "plain" with `logits`, or "kv") and split it.

    Returns (template, {initializer: Source}, {parameter: shape in the one-layer model}); the template's
    parameter initializers hold no values."""
    from .onnx_kv import KVCacheLM, trace_kv
    from .onnx_plain import write_onnx

    model = one_layer_model(config)
    arch = archs.arch_of(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "template.onnx"
        if kind == "kv":
            wrapper = KVCacheLM(model).eval()
            wrapper.arch = MarkedArch(wrapper.arch)
            trace_kv(model, path, wrapper)
            per_layer = kv_names()
        else:
            with marked_layer(arch.decoder_layers(model)[0]):
                write_onnx(model, path, logits, seqlen)
            per_layer = {}
        proto = load_onnx(path)
    sources = identify(proto, model)
    for t in proto.graph.initializer:        # the random values are not needed: keep the shapes only
        if t.name in sources:
            t.ClearField("raw_data")
    proto = _fresh(proto)
    prefix = f"{arch.layers}.0."
    layer_inits = {n for n, s in sources.items() if s.param.startswith(prefix)}
    template = split(proto, layer_inits, per_layer, arch.layers.rsplit(".", 1)[-1])
    return template, sources, {n: list(p.shape) for n, p in model.named_parameters()}


def _fresh(proto):
    """A copy of `proto` in memory of its own (what a cleared field held is not kept)."""
    from onnx import ModelProto

    out = ModelProto()
    out.CopyFrom(proto)
    return out


def full_name(param: str, layers_prefix: str, i: int) -> str:
    """A one-layer model's parameter name as layer i's name in the full model (others unchanged)."""
    head = f"{layers_prefix}.0."
    return f"{layers_prefix}.{i}." + param[len(head):] if param.startswith(head) else param
