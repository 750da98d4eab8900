"""Export a causal LM to a deployment folder for CPU engines (DeepSparse, ONNX Runtime).

The folder holds model.onnx (+ model.onnx.data when the weights pass 2 GB), config.json, the
tokenizer files and sparse_export.json, whose sparsity figures are counted in the ONNX file itself.

Graph: inputs input_ids, attention_mask (int64, [batch, sequence]), one output, dynamic batch and
sequence axes, opset 17. The output depends on the variant (`logits`):
  last  logits of the last position only, [batch, 1, vocab]: what a prefill for generation needs,
        and the default (the LM head no longer dominates small models). Assumes left padding.
  all   logits of every position, [batch, sequence, vocab].
  none  no LM head: the last hidden state, [batch, sequence, hidden] (to time the decoder stack).
"""

import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import models
from .errors import UserError
from .outputs import META_FILE, atomic_dir, library_versions, read_meta, write_json

ONNX_FILE = "model.onnx"
OPSET = 17
LOGITS = ("last", "all", "none")
INPUTS = ("input_ids", "attention_mask")
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, less room for the graph itself
MATRIX_OPS = ("MatMul", "Gemm", "Gather")


def output_name(logits):
    return "hidden_states" if logits == "none" else "logits"


class ExportModule(nn.Module):
    """(input_ids, attention_mask) -> one plain tensor, as the graph should compute it."""

    def __init__(self, lm, logits="last"):
        super().__init__()
        if logits not in LOGITS:
            raise UserError(f"unknown logits variant '{logits}' (choose from {', '.join(LOGITS)})")
        self.lm, self.logits = lm, logits

    def forward(self, input_ids, attention_mask):
        if self.logits == "none":
            return self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
        keep = 1 if self.logits == "last" else 0  # transformers: 0 keeps every position
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=keep).logits


def is_deployment(folder):
    return (Path(folder) / ONNX_FILE).is_file()


@torch.no_grad()
def write_onnx(model, path, logits="last", seqlen=16):
    """Trace `model` (converted to float32 in place) into the ONNX file `path`."""
    path = Path(path)
    model.float().eval()
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")  # plain MatMul/Softmax: every engine runs it
    try:
        wrapper = ExportModule(model, logits).eval()  # export restores the wrapper's mode
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, max(seqlen, 2)), generator=g)
        axes = {0: "batch", 1: "sequence"}
        out = output_name(logits)
        with tempfile.TemporaryDirectory(dir=path.parent) as raw, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw_file = Path(raw) / ONNX_FILE
            # constant folding only pre-transposes Linear weights: zeros stay exactly zero
            torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(raw_file), dynamo=False,
                              opset_version=OPSET, do_constant_folding=True,
                              input_names=list(INPUTS), output_names=[out],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, out: axes})
            if len(os.listdir(raw)) == 1 and raw_file.stat().st_size <= EXTERNAL_DATA_BYTES:
                os.replace(raw_file, path)  # weights inline and small enough: final as it is
            else:  # past 2 GB torch writes one data file per tensor: gather them into one
                save_onnx(_load_onnx(raw_file), path)
    finally:
        model.set_attn_implementation(attn)
    return path


def _load_onnx(path_or_proto):
    import onnx

    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    return onnx.load(str(path_or_proto))


def save_onnx(proto, path):
    """One .onnx file, or .onnx plus one .onnx.data file when the weights exceed what protobuf holds."""
    import onnx

    nbytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if nbytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _scope(node_name):
    """'/lm/model/layers.0/mlp/up_proj/MatMul' -> 'lm.model.layers.0.mlp.up_proj' (the traced module)."""
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1])


def weight_sparsity(onnx_file):
    """Zeros of every weight initializer (2-D and up) counted in the ONNX file.

    Returns {initializer: {scope, op, transposed, shape, zeros, sparsity}}: `scope` is the traced
    module whose MatMul/Gemm/Gather reads it. MatMul reads Linear weights pre-transposed (in x out),
    so `transposed` says how to compare with the checkpoint's out x in matrix.
    """
    from onnx import numpy_helper

    proto = _load_onnx(onnx_file)
    inits = {t.name: t for t in proto.graph.initializer if len(t.dims) >= 2}
    readers = {}
    for node in proto.graph.node:
        if node.op_type in MATRIX_OPS:
            w = node.input[0] if node.op_type == "Gather" else node.input[1]
            if w in inits and w not in readers:
                readers[w] = node
    out = {}
    for name, t in inits.items():
        arr = numpy_helper.to_array(t)
        zeros = int(arr.size - np.count_nonzero(arr))
        node = readers.get(name)
        trans_b = node is not None and any(a.name == "transB" and a.i for a in node.attribute)
        out[name] = {"scope": _scope(node.name) if node is not None else None,
                     "op": node.op_type if node is not None else None,
                     "transposed": node is not None and node.op_type in ("MatMul", "Gemm") and not trans_b,
                     "shape": list(arr.shape), "zeros": zeros, "sparsity": zeros / max(arr.size, 1)}
    return out


def _digest(matrix):
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    return hashlib.blake2b(m.tobytes() + str(m.shape).encode(), digest_size=16).hexdigest()


def match_modules(weights, onnx_file, model):
    """Find the ONNX initializer of each prunable module by its exact contents.

    Sets `module` and `prunable` on the rows of `weights`. Returns a list of problems: empty when
    every prunable module's out x in matrix is held, value for value, by one initializer (so the
    zero counts are equal too). Traced scopes are unreliable names, so they only break ties.
    """
    from onnx import numpy_helper

    by_digest = {}
    for t in _load_onnx(onnx_file).graph.initializer:
        row = weights.get(t.name)
        if row is not None and row["op"] in ("MatMul", "Gemm"):
            arr = numpy_helper.to_array(t)
            by_digest.setdefault(_digest(arr.T if row["transposed"] else arr), []).append(t.name)
    for row in weights.values():
        row.update(module=None, prunable=False)
    problems = []
    for module in models.prunable_names(model):
        hits = by_digest.get(_digest(models.weight_2d(model.get_submodule(module)).float().numpy()), [])
        if not hits:
            problems.append(f"{module}: no ONNX initializer holds its weight")
            continue
        leaf = module.rsplit(".", 1)[-1]
        pick = next((h for h in hits if (weights[h]["scope"] or "").endswith(leaf)), hits[0])
        hits.remove(pick)
        weights[pick].update(module=module, prunable=True)
    return problems


def sparsity_summary(weights):
    """Overall sparsity of the prunable matrices and of all weight initializers."""
    def frac(rows):
        n = sum(int(np.prod(r["shape"])) for r in rows)
        return sum(r["zeros"] for r in rows) / n if n else 0.0

    prunable = [r for r in weights.values() if r.get("prunable")]
    return {"prunable_sparsity": frac(prunable), "prunable_matrices": len(prunable),
            "all_weights_sparsity": frac(list(weights.values())), "weight_initializers": len(weights)}


def write_deployment(model, tokenizer, folder, logits="last", seqlen=16, source=None, log=print):
    """Write a deployment folder for an in-memory model. Returns its metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx_path = write_onnx(model, folder / ONNX_FILE, logits, seqlen)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    proto = _load_onnx(onnx_path)  # counted in the file as written
    weights = weight_sparsity(proto)
    problems = match_modules(weights, proto, model)
    del proto
    if problems:
        raise UserError(f"the exported weights do not match the model: {problems[0]}")
    summary = sparsity_summary(weights)
    meta = {
        "kind": "deployment",
        "format": "onnx",
        "logits": logits,
        "output": output_name(logits),
        "inputs": list(INPUTS),
        "opset": OPSET,
        "onnx_file": ONNX_FILE,
        "external_data": (folder / (ONNX_FILE + ".data")).exists(),
        "trace_seqlen": seqlen,
        "architecture": models.model_type(model),
        **summary,
        "weights": weights,
        "export_s": time.perf_counter() - t0,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if source is not None:
        meta.update(_source_fields(source, folder))
    write_json(folder / META_FILE, meta)
    log(f"exported {summary['prunable_matrices']} prunable matrices at "
        f"{summary['prunable_sparsity']:.1%} sparsity (counted in the ONNX file), logits={logits}")
    return meta


def _source_fields(source, folder):
    """Where the weights came from: the spec, and for folders a path relative to the deployment."""
    p = Path(str(source)).expanduser()
    if not p.is_dir():
        return {"source_model": str(source)}
    pruned = read_meta(p)
    fields = {"source_model": str(p.resolve()),
              "source_model_relative": os.path.relpath(p.resolve(), Path(folder).resolve())}
    if pruned.get("kind") == "pruned-model":
        fields["pruning"] = {"recipe": pruned.get("recipe"), "pruned_sparsity": pruned.get("pruned_sparsity")}
    return fields


def source_model(folder):
    """The model a deployment folder was exported from (for the torch runtime), or None."""
    meta = read_meta(folder)
    rel = meta.get("source_model_relative")
    if rel and (Path(folder) / rel / "config.json").is_file():
        return str((Path(folder) / rel).resolve())
    return meta.get("source_model")


def export_onnx(model_spec, out, logits="last", seqlen=16, force=False, log=print):
    """`export onnx`: load MODEL, write the deployment folder `out` atomically. Returns the metadata."""
    if logits not in LOGITS:
        raise UserError(f"unknown logits variant '{logits}' (choose from {', '.join(LOGITS)})")
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    with atomic_dir(out, force) as tmp:
        model, tokenizer = models.load_model(model_spec)
        # tmp and out are siblings: paths relative to tmp hold for out too
        meta = write_deployment(model, tokenizer, tmp, logits, seqlen, source=model_spec, log=log)
    log(f"wrote {out}")
    return meta
