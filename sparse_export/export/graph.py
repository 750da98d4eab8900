"""What every ONNX export shares: file names and opset, the plain graph's interface (ExportModule: what
it computes from input_ids and attention_mask), saving with external data, and the weight initializers
counted and matched to the model's modules in the file as written.
"""

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import models
from ..errors import UserError
from ..outputs import read_meta

ONNX_FILE = "model.onnx"
OPSET = 17
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, less room for the graph itself
MATRIX_OPS = ("MatMul", "Gemm", "Gather")
LOGITS = ("last", "all", "none")
PLAIN_INPUTS = ("input_ids", "attention_mask")


def output_name(logits: str) -> str:
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




def is_deployment(folder) -> bool:
    return (Path(folder) / ONNX_FILE).is_file()


def load_onnx(path_or_proto) -> Any:
    import onnx

    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    return onnx.load(str(path_or_proto))


def save_onnx(proto, path) -> None:
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


def weight_sparsity(onnx_file) -> dict[str, dict]:
    """Zeros of every weight initializer (2-D and up) counted in the ONNX file.

    Returns {initializer: {scope, op, transposed, shape, zeros, sparsity}}: `scope` is the traced
    module whose MatMul/Gemm/Gather reads it. MatMul reads Linear weights pre-transposed (in x out),
    so `transposed` says how to compare with the checkpoint's out x in matrix.
    """
    import onnx

    if isinstance(onnx_file, onnx.ModelProto):
        proto, folder = onnx_file, None
    else:  # external data is read one tensor at a time, not loaded with the graph
        proto, folder = onnx.load(str(onnx_file), load_external_data=False), Path(onnx_file).parent
    inits = {t.name: t for t in proto.graph.initializer if len(t.dims) >= 2}
    readers = {}
    for node in proto.graph.node:
        if node.op_type in MATRIX_OPS:
            w = node.input[0] if node.op_type == "Gather" else node.input[1]
            if w in inits and w not in readers:
                readers[w] = node
    out = {}
    for name, t in inits.items():
        size = int(np.prod(t.dims))
        zeros = size - count_nonzero(t, folder)
        node = readers.get(name)
        trans_b = node is not None and any(a.name == "transB" and a.i for a in node.attribute)
        out[name] = {"scope": _scope(node.name) if node is not None else None,
                     "op": node.op_type if node is not None else None,
                     "transposed": node is not None and node.op_type in ("MatMul", "Gemm") and not trans_b,
                     "shape": list(t.dims), "zeros": zeros, "sparsity": zeros / max(size, 1)}
    return out


def count_nonzero(t, folder=None, chunk: int = 64 * 2**20) -> int:
    """Nonzeros of an initializer; external data (in `folder`) is read in chunks of `chunk` bytes."""
    from onnx import TensorProto, helper, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return int(np.count_nonzero(numpy_helper.to_array(t)))
    info = {e.key: e.value for e in t.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    left = int(np.prod(t.dims)) * dtype.itemsize
    step = max(dtype.itemsize, chunk - chunk % dtype.itemsize)
    count = 0
    with open(Path(folder) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while left > 0:
            buf = f.read(min(step, left))
            if not buf:
                raise UserError(f"{info['location']} ends inside initializer {t.name}")
            count += int(np.count_nonzero(np.frombuffer(buf, dtype)))
            left -= len(buf)
    return count


def digest(matrix: np.ndarray) -> str:
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    return hashlib.blake2b(m.tobytes() + str(m.shape).encode(), digest_size=16).hexdigest()


def match_modules(weights: dict, onnx_file, model) -> list[str]:
    """Find the ONNX initializer of each prunable module by its exact contents.

    Sets `module` and `prunable` on the rows of `weights`. Returns a list of problems: empty when
    every prunable module's out x in matrix is held, value for value, by one initializer (so the
    zero counts are equal too). Traced scopes are unreliable names, so they only break ties.
    """
    from onnx import numpy_helper

    by_digest = {}
    for t in load_onnx(onnx_file).graph.initializer:
        row = weights.get(t.name)
        if row is not None and row["op"] in ("MatMul", "Gemm"):
            arr = numpy_helper.to_array(t)
            by_digest.setdefault(digest(arr.T if row["transposed"] else arr), []).append(t.name)
    for row in weights.values():
        row.update(module=None, prunable=False)
    problems = []
    for module in models.prunable_names(model):
        hits = by_digest.get(digest(models.weight_2d(model.get_submodule(module)).float().numpy()), [])
        if not hits:
            problems.append(f"{module}: no ONNX initializer holds its weight")
            continue
        leaf = module.rsplit(".", 1)[-1]
        pick = next((h for h in hits if (weights[h]["scope"] or "").endswith(leaf)), hits[0])
        hits.remove(pick)
        weights[pick].update(module=module, prunable=True)
    return problems


def sparsity_summary(weights: dict) -> dict:
    """Overall sparsity of the prunable matrices and of all weight initializers."""
    def frac(rows):
        n = sum(int(np.prod(r["shape"])) for r in rows)
        return sum(r["zeros"] for r in rows) / n if n else 0.0

    prunable = [r for r in weights.values() if r.get("prunable")]
    return {"prunable_sparsity": frac(prunable), "prunable_matrices": len(prunable),
            "all_weights_sparsity": frac(list(weights.values())), "weight_initializers": len(weights)}


def source_fields(source, folder) -> dict:
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


def source_model(folder) -> str | None:
    """The model a deployment folder was exported from (for the torch runtime), or None."""
    meta = read_meta(folder)
    rel = meta.get("source_model_relative")
    if rel and (Path(folder) / rel / "config.json").is_file():
        return str((Path(folder) / rel).resolve())
    return meta.get("source_model")


