"""Export a causal LM to a deployment folder for CPU engines (DeepSparse, ONNX Runtime).

The folder holds model.onnx (+ model.onnx.data when the weights pass 2 GB), config.json, the
tokenizer files and sparse_export.json, whose sparsity figures are counted in the ONNX file itself.

Graph: inputs input_ids, attention_mask (int64, [batch, sequence]), one output, dynamic batch and
sequence axes, opset 17. The output depends on the variant (`logits`):
  last  logits of the last position only, [batch, 1, vocab] (declared so: the 1 is fixed in the graph's
        output shape): what a prefill for generation needs,
        and the default (the LM head no longer dominates small models). Assumes left padding.
  all   logits of every position, [batch, sequence, vocab].
  none  no LM head: the last hidden state, [batch, sequence, hidden] (to time the decoder stack).
"""

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .. import archs, compat, models
from ..errors import UserError
from ..outputs import META_FILE, atomic_dir, library_versions, write_json
from . import graph
from .graph import (LOGITS, ONNX_FILE, OPSET, PLAIN_INPUTS, ExportModule, load_onnx,
                    match_modules, output_name, save_onnx, source_fields, sparsity_summary, weight_sparsity)
from .validate import validate_plain


@torch.no_grad()
def write_onnx(model, path, logits: str = "last", seqlen: int = 16) -> Path:
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
        out_axes = {0: "batch"} if logits == "last" else axes  # last: declared [batch, 1, vocab], as returned
        with tempfile.TemporaryDirectory(dir=path.parent) as raw, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw_file = Path(raw) / ONNX_FILE
            # constant folding only pre-transposes Linear weights: zeros stay exactly zero
            torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(raw_file), dynamo=False,
                              opset_version=OPSET, do_constant_folding=True,
                              input_names=list(PLAIN_INPUTS), output_names=[out],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, out: out_axes})
            inline = len(os.listdir(raw)) == 1 and raw_file.stat().st_size <= graph.EXTERNAL_DATA_BYTES
            if inline and logits != "last":
                os.replace(raw_file, path)  # weights inline and small enough: final as it is
            else:  # past 2 GB torch writes one data file per tensor: gather them into one
                proto = load_onnx(raw_file)
                if logits == "last":
                    fix_output_dim(proto, 1, 1)
                save_onnx(proto, path)
    finally:
        model.set_attn_implementation(attn)
    return path


def fix_output_dim(proto, axis: int, size: int) -> None:
    """Declare the first output's `axis` as the fixed `size` (torch names it with a made-up symbol)."""
    dim = proto.graph.output[0].type.tensor_type.shape.dim[axis]
    dim.Clear()
    dim.dim_value = size


def write_deployment(model, tokenizer, folder, logits: str = "last", seqlen: int = 16, source=None,
                     validate: bool = True, log=print) -> dict:
    """Write a deployment folder for an in-memory model. Returns its metadata.

    validate: run the graph on ONNX Runtime against the model (validate.validate_plain), refuse past
    the tolerance, and record the difference under "validation" (callers that rewrite the graph
    afterwards, like the INT8 export, validate what they finally write themselves).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx_path = write_onnx(model, folder / ONNX_FILE, logits, seqlen)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    compat.portable_folder(folder)  # files transformers 4 / tokenizers 0.15 (DeepSparse's pipeline) read
    proto = load_onnx(onnx_path)  # counted in the file as written
    weights = weight_sparsity(proto)
    problems = match_modules(weights, proto, model)
    del proto
    if problems:
        raise UserError(f"the exported weights do not match the model: {problems[0]}")
    summary = sparsity_summary(weights)
    validation = validate_plain(model, onnx_path, logits) if validate else None
    meta = {
        **plain_fields(model.config, logits, seqlen, (folder / (ONNX_FILE + ".data")).exists()),
        "architecture": archs.model_type(model),
        **summary,
        **({"validation": validation} if validation else {}),
        "weights": weights,
        "export_s": time.perf_counter() - t0,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if source is not None:
        meta.update(source_fields(source, folder))
    write_json(folder / META_FILE, meta)
    checked = (f"; ONNX Runtime within {validation['max_abs_diff']:.1e} of torch" if validation else "")
    log(f"exported {summary['prunable_matrices']} prunable matrices at "
        f"{summary['prunable_sparsity']:.1%} sparsity (counted in the ONNX file), logits={logits}{checked}")
    return meta


def plain_fields(config, logits: str, seqlen: int, external_data: bool) -> dict:
    """What a plain deployment's sparse_export.json says about its graph."""
    return {
        "kind": "deployment",
        "format": "onnx",
        "logits": logits,
        "output": output_name(logits),
        "inputs": list(PLAIN_INPUTS),
        "opset": OPSET,
        "onnx_file": ONNX_FILE,
        "external_data": external_data,
        "trace_seqlen": seqlen,
        "declared_output_shape": ["batch", 1 if logits == "last" else "sequence",
                                  config.vocab_size if logits != "none" else config.hidden_size],
        # DeepSparse's own benchmark runs its engine only on fixed shapes, and -shapes rewrites model.onnx
        # in place: run it on a copy (docs/interop.md)
        "deepsparse_benchmark": 'cp -r DEPLOY /tmp/bench && deepsparse.benchmark /tmp/bench/model.onnx '
                                '-shapes "[1,400],[1,400]"   (batch 1 x 400 tokens: both inputs)',
    }


def export_onnx(model_spec, out, logits: str = "last", seqlen: int = 16, force: bool = False, log=print) -> dict:
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
