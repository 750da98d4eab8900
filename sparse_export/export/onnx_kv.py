"""KV-cache ONNX export: one graph for the prompt (many tokens) and each decode step (one token),
with the names and cache layout of DeepSparse 1.8's text-generation pipeline (written out, with the
inputs of each call and the cache kept between calls, in kv_layout.py). Each decoder block runs the
model's own modules as its archs.py entry says, with an explicit cache of num_key_value_heads heads.

INT8 (`export onnx --kv-cache --int8`): the same calibration as the plain INT8 graph (onnx_int8.prepare_int8:
a plain forward over the calibration windows; a Linear reads the same tensor with or without a cache),
then the traced KV-cache graph gets the same rewrite of its Linear MatMuls and LM head
(onnx_int8.quantize_graph). The attention score matmuls stay fp32 here: the KV block's attention is
archs.attend over the concatenated cache, not the model's attention function that int8_calib hooks to
measure and fake-quantize query and key, so the torch reference could not reproduce an int8 score matmul.
"""

import time
import warnings

import numpy as np
import torch
from torch import nn

from .. import archs, compat, models
from ..errors import UserError
from ..outputs import META_FILE, Timer, atomic_dir, library_versions, write_json
from .graph import OPSET, match_modules, save_onnx, sparsity_summary, weight_sparsity
from .kv_layout import KV_INPUTS, cache_names, cache_spec, step_feed
from .validate import validate_kv


class KVCacheLM(nn.Module):
    """Runs the HF model's own layers with an explicit cache; returns plain tensors.

    What each block computes comes from the model's entry in archs.py (embed, block, head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.arch = archs.arch_of(model)
        if not self.arch.kv_cache:
            raise UserError(f"KV-cache export does not support architecture '{self.arch.model_type}' "
                            f"(supported: {', '.join(archs.KV_CACHE)})")
        self.layers = models.decoder_layers(model)
        self.dims = self.arch.cache_shape(model.config)

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        allowed = causal_mask * attention_mask[:, None, None, :]
        bias = (1.0 - allowed.float()) * torch.finfo(torch.float32).min
        h, ctx = self.arch.embed(self.model, input_ids, positions)
        presents = []
        for i, layer in enumerate(self.layers):
            h, k, v = self.arch.block(layer, h, bias, past[2 * i], past[2 * i + 1], ctx, self.dims)
            presents += [k, v]
        return (self.arch.head(self.model, h), *presents)


def check_supported(model, max_length: int) -> None:
    """UserError for architectures or settings the wrapper does not reproduce exactly."""
    c, arch = model.config, archs.arch_of(model)
    if not arch.kv_cache:
        raise UserError(f"KV-cache export does not support architecture '{arch.model_type}' "
                        f"(supported: {', '.join(archs.KV_CACHE)})")
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        raise UserError(f"KV-cache export does not support rope_type '{rope}'")
    sliding = arch.sliding_window(c)
    if sliding and max_length > sliding:
        raise UserError(f"--max-length {max_length} exceeds the model's sliding window ({sliding}); "
                        f"use --max-length {sliding} or less")
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    if arch.learned_positions and limit and max_length > limit:
        raise UserError(f"--max-length {max_length} exceeds the model's {limit} learned positions")


def export_kv_onnx(model_spec, out, max_length: int = 2048, force: bool = False, log=print,
                   int8: dict | None = None) -> dict:
    """Export MODEL as a KV-cache ONNX deployment folder at `out`, atomically. Returns the metadata.

    int8: {calib, nsamples, seqlen, seed, percentile, outlier_ratio, attention, head, max_error} (as
    onnx_int8.export_int8 takes them; "attention" only chooses the calibration pass, the score matmuls stay
    fp32): the INT8 KV-cache graph."""
    if max_length < 2:
        raise UserError("--max-length must be at least 2")
    q = _int8_options(model_spec, int8, log) if int8 is not None else None
    with atomic_dir(out, force) as tmp:
        with Timer() as t_load:
            model, tokenizer = models.load_model(model_spec)
        stored_dtype = model.dtype
        model = model.float().eval()
        check_supported(model, max_length)
        n_layers, kv_heads, head_dim = cache_spec(model)
        if q is not None:   # the plain INT8 graph's calibration pass (its attention qparams are not used)
            from .onnx_int8 import calibrate

            c = calibrate(model, tokenizer, model_spec, q["calibration"], q["percentile"], q["outlier_ratio"],
                          stored_dtype, q["attention"], q["max_error"], q["head"])
        with Timer() as t_export:
            trace_kv(model, tmp / "model.onnx")
            done = {}
            if q is not None:
                from .graph import load_onnx
                from .onnx_int8 import quantize_graph

                proto = load_onnx(tmp / "model.onnx")
                done = quantize_graph(proto, model, c["scales"], c["qparams"])
                save_onnx(proto, tmp / "model.onnx")
        weights = weight_sparsity(tmp / "model.onnx")  # counted in the file, as the plain export does
        problems = [x for x in match_modules(weights, tmp / "model.onnx", model) if x.split(":")[0] not in done]
        if problems:
            raise UserError(f"the exported weights do not match the model: {problems[0]}")
        for module, row in done.items():         # int8 initializers: named by us, module known
            weights[row["initializer"]].update(module=module, prunable=module != c["head"]["module"],
                                               op="MatMulInteger", transposed=True)
            if row["zeros"] != int((models.weight_2d(model.get_submodule(module)) == 0).sum()):
                raise UserError(f"{module}: zero count changed in the int8 export")
        summary = sparsity_summary(weights)
        validation = validate_kv(model, tmp / "model.onnx", max_length,
                                 qparams=c["qparams"] if q is not None else None)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        compat.portable_folder(tmp)  # files DeepSparse's pipeline (transformers 4, tokenizers 0.15) reads
        meta = {
            **kv_meta(model.config, n_layers, kv_heads, head_dim, max_length),
            "format": "onnx",
            "source_model": str(model_spec),
            "architecture": archs.model_type(model),
            "opset": OPSET,
            **summary,
            "validation": validation,
            "weights": weights,
            "timing": {"load_s": t_load.wall, "export_s": t_export.wall},
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if q is not None:
            meta["int8"] = kv_int8_fields(model, set(done), c["scales"], c["qparams"], c["head"], c["extra"])
        write_json(tmp / META_FILE, meta)
    log(f"wrote KV-cache ONNX to {out}: max length {max_length}, cache {n_layers} layers x {kv_heads} KV heads "
        f"x {head_dim}; {summary['prunable_matrices']} prunable matrices at {summary['prunable_sparsity']:.1%} "
        f"sparsity (counted in the ONNX file)")
    return meta


def _int8_options(model_spec, int8: dict, log) -> dict:
    """The INT8 options with their defaults, checked, and the calibration resolved, before loading."""
    from .onnx_int8 import OUTLIER_RATIO, check_int8_options, resolve_calibration

    q = {"percentile": None, "outlier_ratio": OUTLIER_RATIO, "attention": True, "head": True, "max_error": None,
         **{k: v for k, v in int8.items() if v is not None}}
    check_int8_options(q["percentile"], q["outlier_ratio"], q["max_error"])
    q["calibration"] = resolve_calibration(model_spec, q.get("calib"), q.get("nsamples"), q.get("seqlen"),
                                           q.get("seed"), log)
    return q


def kv_int8_fields(model, quantized: set, scales: dict, qparams: dict, head: dict, extra: dict) -> dict:
    """The "int8" entry of an INT8 KV-cache deployment (onnx_int8.int8_fields, attention scores fp32).
    quantized: the modules whose matmuls are int8 (the head among them when it is)."""
    from .onnx_int8 import int8_fields

    return int8_fields(len(quantized - {head["module"]}), sorted(set(models.prunable_names(model)) - quantized),
                       scales, qparams, {}, {
                           **extra, "kv_cache_attention": "score matmuls fp32 in the KV-cache graph (its attention "
                                                          "is archs.attend over the cache, not the hooked attention "
                                                          "function)"}, head)


def kv_meta(config, n_layers: int, kv_heads: int, head_dim: int, max_length: int) -> dict:
    """What a KV-cache deployment's sparse_export.json says about its graph and cache."""
    return {
        "kind": "onnx-kv-cache",
        "max_length": max_length,
        "logits": "all",
        # what DeepSparse's own pipeline needs (its default internal_kv_cache=True aborts in its compiler;
        # it rewrites model.onnx in place: give it a copy). docs/interop.md
        "deepsparse_pipeline": f"deepsparse.TextGeneration(model_path=COPY_OF_THIS_FOLDER, "
                               f"internal_kv_cache=False, sequence_length={max_length})",
        "cache": {
            "layers": n_layers, "kv_heads": kv_heads, "query_heads": config.num_attention_heads,
            "head_dim": head_dim, "dtype": "float32",
            "inputs": KV_INPUTS + ["past_key_values.{i}.key", "past_key_values.{i}.value"],
            "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
            "layout": (
                "L = max_length, n = tokens in this call. attention_mask [B, L]: 1 on valid slots, "
                "right-aligned. positions [B, n]: absolute positions. causal_mask [B, 1, n, L]: 1 where "
                "token i may attend slot j. past_key_values.i.* [B, kv_heads, L - n, head_dim]; "
                "present.i.* [B, kv_heads, L, head_dim] = concat(past, new); keep its last L - n' slots "
                "for the next call with n' tokens. Same layout as DeepSparse 1.8 text generation."),
        },
    }


@torch.no_grad()
def trace_kv(model, path, wrapper=None) -> None:
    """Trace the KV-cache graph of `model` (through `wrapper`, by default KVCacheLM(model)) into `path`."""
    import onnx

    wrapper = wrapper if wrapper is not None else KVCacheLM(model).eval()
    n_layers, kv, d = cache_spec(model)
    n, past = 3, 5  # tracing shapes; every axis below is dynamic
    feed = step_feed(np.arange(1, n + 1)[None], 2, n + past)
    args = [torch.from_numpy(feed[k]) for k in KV_INPUTS]
    args += [torch.randn(1, kv, past, d) for _ in range(2 * n_layers)]
    past_names, present_names = cache_names(n_layers, "past_key_values"), cache_names(n_layers, "present")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "positions": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"},
            "causal_mask": {0: "batch", 2: "seq", 3: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({p: {0: "batch", 2: "past"} for p in past_names})
    axes.update({p: {0: "batch", 2: "total"} for p in present_names})
    scratch = path.parent / "_export"
    scratch.mkdir()
    with warnings.catch_warnings():  # tracer notes on shape-dependent branches (rotary: fixed per model)
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(args), str(scratch / path.name), dynamo=False, opset_version=OPSET,
                          input_names=KV_INPUTS + past_names, output_names=["logits"] + present_names,
                          dynamic_axes=axes, do_constant_folding=True)
    save_onnx(onnx.load(str(scratch / path.name)), path)  # external data past 2 GB
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
