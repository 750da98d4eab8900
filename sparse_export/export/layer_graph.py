"""One decoder layer's ONNX graph, repeated: the graph of a model traced with a single decoder layer (the
template) split into what runs before the layers, the layer, and the head, then put together for any
number of layers with per-layer names.

The trace marks the layer's boundary: its input and output hidden states pass through a marker op
(`sparse_export::Mark`, removed after tracing), so the split does not depend on how the exporter names
nodes. Nodes that depend on the layer's input, its initializers or its own graph inputs (the KV cache)
form the layer; nodes that depend on its output form the head; everything else (embeddings, the
attention mask, rotary tables, constants) is computed once and shared by every layer. Initializers
are told apart by their values (see onnx_stream.py): the layer's are renamed per layer, the others
are shared.
"""

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..layerwise import layer_out

MARK_DOMAIN = "sparse_export"


class _Mark(torch.autograd.Function):
    """Identity in torch; a `sparse_export::Mark` node (attribute tag) in the ONNX trace."""

    @staticmethod
    def forward(ctx, x, tag):
        return x.clone()

    @staticmethod
    def symbolic(g, x, tag):
        y = g.op(f"{MARK_DOMAIN}::Mark", x, tag_s=tag)
        y.setType(x.type())
        return y


def mark(x: torch.Tensor, tag: str) -> torch.Tensor:
    """x, marked as the layer's input ("in") or output ("out") in a trace."""
    return _Mark.apply(x, tag)


@contextlib.contextmanager
def marked_layer(layer) -> Iterator[None]:
    """Mark the hidden states entering and leaving decoder `layer` while the block runs."""
    def enter(module, args, kwargs):
        if args:
            return (mark(args[0], "in"),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": mark(kwargs["hidden_states"], "in")}

    def leave(module, args, kwargs, out):
        if isinstance(out, (tuple, list)):
            return type(out)([mark(layer_out(out), "out"), *out[1:]])
        return mark(out, "out")

    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True),
               layer.register_forward_hook(leave, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class MarkedArch:
    """An archs.py entry whose `block` marks its input and output hidden states (the KV-cache trace)."""

    def __init__(self, arch):
        self.arch = arch

    def __getattr__(self, name):
        return getattr(self.arch, name)

    def block(self, layer, h, *args):
        h, k, v = self.arch.block(layer, mark(h, "in"), *args)
        return mark(h, "out"), k, v


@dataclass
class Template:
    """A one-layer graph split at the layer's boundary.

    shared: nodes computed once (before the layers); layer: layer 0's nodes; head: the nodes after.
    h_src: the tensor the first layer reads (embeddings); h_in: the name layer 0's nodes read it by
    (replaced by the previous layer's output in later layers). h_out: layer 0's output; head_in: the
    name the head reads it by. layer_inits: layer 0's initializers. per_layer: graph inputs and outputs
    of layer 0 (the KV cache) -> a function giving layer i's name.
    """

    proto: object
    shared: list
    layer: list
    head: list
    h_src: str
    h_in: str
    h_out: str
    head_in: str
    layer_inits: set
    per_layer: dict = field(default_factory=dict)
    leaf: str = "layers"

    def rename(self, name: str, i: int) -> str:
        """Layer i's name for a tensor or node of layer 0."""
        if name in self.per_layer:
            return self.per_layer[name](i)
        new, n = re.subn(rf"(^|[/.]){re.escape(self.leaf)}\.0(?=[/.]|$)", rf"\g<1>{self.leaf}.{i}", name)
        return new if n else f"{self.leaf}.{i}/{name}"


def _remove_marks(graph) -> dict[str, tuple[str, str]]:
    """Drop the Mark nodes. Returns {tag: (marked tensor, the name its readers use)}."""
    tags = {}
    for n in graph.node:
        if n.domain == MARK_DOMAIN:
            tag = next(a.s.decode() for a in n.attribute if a.name == "tag")
            if tag in tags:
                raise UserError(f"the one-layer trace has two '{tag}' marks (the layer ran twice?)")
            tags[tag] = (n.input[0], n.output[0])
    if set(tags) != {"in", "out"}:
        raise UserError("the one-layer trace did not mark the decoder layer's input and output")
    if any(o.name in (tags["in"][1], tags["out"][1]) for o in graph.output):
        raise UserError("a marked hidden state is a graph output; the template cannot be split")
    keep = [n for n in graph.node if n.domain != MARK_DOMAIN]
    del graph.node[:]
    graph.node.extend(keep)
    return tags


def split(proto, layer_inits: set, per_layer: dict[str, Callable[[int], str]], leaf: str) -> Template:
    """Split a marked one-layer graph (in place: marks removed, custom opset dropped) into a Template.

    layer_inits: initializers holding layer 0's weights. per_layer: graph inputs/outputs of layer 0
    (the KV cache) -> layer i's name."""
    g = proto.graph
    (h_src, h_in), (h_out, head_in) = (v := _remove_marks(g))["in"], v["out"]
    for o in list(proto.opset_import):
        if o.domain == MARK_DOMAIN:
            proto.opset_import.remove(o)
    layer_t = {h_in} | set(layer_inits) | {i.name for i in g.input if i.name in per_layer}
    after_t = {head_in}
    shared, layer, head = [], [], []
    for n in g.node:
        ins = set(n.input)
        if ins & after_t:
            if ins & layer_t:
                raise UserError(f"node {n.name} after the layer reads a tensor inside it")
            head.append(n)
            after_t.update(n.output)
        elif ins & layer_t:
            layer.append(n)
            layer_t.update(n.output)
        else:
            shared.append(n)
    produced = {o for n in layer for o in n.output}
    if h_out not in produced:
        raise UserError("the layer's output is not computed from its input")
    for o in g.output:
        if o.name in produced and o.name not in per_layer:
            raise UserError(f"graph output {o.name} comes from inside the layer")
    return Template(proto, shared, layer, head, h_src, h_in, h_out, head_in, set(layer_inits), dict(per_layer),
                    leaf)


def layer_nodes(t: Template, i: int, h_in: str, init_names: dict[str, str]) -> list:
    """Copies of layer 0's nodes for layer i: its tensors and nodes renamed, its input read from `h_in`,
    its initializers renamed by init_names {layer 0 name: layer i name}."""
    from onnx import NodeProto

    produced = {o for n in t.layer for o in n.output}
    out = []
    for n in t.layer:
        c = NodeProto()
        c.CopyFrom(n)
        c.name = t.rename(n.name, i) if n.name else ""
        for j, name in enumerate(n.input):
            if name == t.h_in:
                c.input[j] = h_in
            elif name in init_names:
                c.input[j] = init_names[name]
            elif name in produced or name in t.per_layer:
                c.input[j] = t.rename(name, i)
        for j, name in enumerate(n.output):
            c.output[j] = t.rename(name, i)
        out.append(c)
    return out


def io_for_layers(t: Template, values, n_layers: int) -> list:
    """The graph inputs (or outputs) `values` of the template for n_layers: per-layer ones repeated."""
    from onnx import ValueInfoProto

    out = []
    per = [v for v in values if v.name in t.per_layer]
    for v in values:
        if v.name not in t.per_layer:
            out.append(v)
        elif v.name == per[0].name:     # the per-layer group, in place of the first of them
            for i in range(n_layers):
                for p in per:
                    c = ValueInfoProto()
                    c.CopyFrom(p)
                    c.name = t.rename(p.name, i)
                    out.append(c)
    return out
