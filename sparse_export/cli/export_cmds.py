"""`export onnx`."""

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .app import export_app


@export_app.command("onnx")
def export_onnx_cmd(
    model: str = typer.Argument(..., help="Model folder (e.g. from `prune`), hub id, .gguf file or 'smollm2'."),
    out: Path = typer.Option(..., "--out", help="Deployment folder to write."),
    logits: str = typer.Option("last", help="last: last position only (what a prefill needs) | "
                                            "all: every position | none: no LM head (decoder stack)."),
    seqlen: int = typer.Option(16, help="Tokens in the example input used for tracing; the axes stay dynamic."),
    force: o.Force = False,
    kv_cache: bool = typer.Option(False, "--kv-cache", help="Export the KV-cache graph `generate` runs (with "
                                                            "--int8: its Linear layers and LM head int8)."),
    max_length: int = typer.Option(2048, help="With --kv-cache: the static cache length (prompt + new tokens)."),
    int8: bool = typer.Option(False, "--int8", help="Linear layers as int8 matmuls (weights from a --wbits 8 "
                                                    "model are exact; activations quantized statically)."),
    calib: Optional[str] = typer.Option(None, help="With --int8: text for activation ranges "
                                                   "(wikitext2 | c4 | file.txt | file.jsonl | self; default: the "
                                                   "pruned folder's recipe, else c4)."),
    nsamples: Optional[int] = typer.Option(None, help="With --int8: calibration windows (default: the recipe's, "
                                                      "at most 32)."),
    calib_seqlen: Optional[int] = typer.Option(None, help="With --int8: tokens per calibration window (default: "
                                                          "the recipe's, at most 512)."),
    percentile: Optional[float] = typer.Option(None, help="With --int8: clip activation ranges to this percentile "
                                                          "(default: min/max)."),
    outlier_ratio: Optional[float] = typer.Option(None, help="With --int8: keep a Linear layer fp32 when its input "
                                                             "reaches this many times past its 99.99th percentile "
                                                             "(default 10; 0 quantizes all)."),
    max_error: Optional[float] = typer.Option(None, "--max-error",
                                              help="With --int8: also keep fp32 each Linear layer whose output "
                                                   "its int8 input changes by more than this relative squared "
                                                   "error on the calibration text (e.g. 0.003; default: off)."),
    fp32_attention: bool = typer.Option(False, "--fp32-attention", help="With --int8: keep the attention score "
                                                                        "matmuls (query x key) fp32."),
    fp32_head: bool = typer.Option(False, "--fp32-head", help="With --int8: keep the LM head fp32 (default: "
                                                              "int8 weights, one scale per vocabulary row)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Export one decoder layer at a time from the safetensors shards "
                                               "(default: when the in-memory export would pass --memory-budget; "
                                               "docs/export-at-scale.md)."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget",
                                                  help="GiB the in-memory export may use; larger safetensors "
                                                       "folders are streamed (default 8)."),
):
    """Export MODEL to ONNX for DeepSparse / ONNX Runtime, with its sparsity counted in the file."""
    from ..errors import UserError

    int8_opts = {"--calib": calib, "--nsamples": nsamples, "--calib-seqlen": calib_seqlen,
                 "--percentile": percentile, "--outlier-ratio": outlier_ratio, "--max-error": max_error,
                 "--fp32-attention": fp32_attention or None, "--fp32-head": fp32_head or None}
    if not int8 and any(v is not None for v in int8_opts.values()):
        raise UserError(f"{next(k for k, v in int8_opts.items() if v is not None)} applies to --int8 only")
    from ..export.onnx_stream import EXPORT_BUDGET, choose_stream

    if memory_budget is not None and memory_budget <= 0:
        raise UserError(f"--memory-budget must be > 0 GiB, got {memory_budget}")
    budget = EXPORT_BUDGET if memory_budget is None else int(memory_budget * 2**30)
    if choose_stream(model, stream, budget):
        if max_error is not None:
            raise UserError("--max-error is not available with the streamed export yet (its calibration sees "
                            "one layer at a time); leave it out or pass --no-stream")
        from ..export.onnx_int8 import OUTLIER_RATIO
        from ..export.onnx_stream import export_streamed

        opts = {"calib": calib, "nsamples": nsamples, "seqlen": calib_seqlen, "percentile": percentile,
                "outlier_ratio": OUTLIER_RATIO if outlier_ratio is None else outlier_ratio,
                "attention": not fp32_attention, "head": not fp32_head}
        kind = "kv" if kv_cache else ("int8" if int8 else "plain")
        return export_streamed(model, out, kind=kind, logits=logits, seqlen=seqlen, max_length=max_length,
                               int8=opts if int8 else None, force=force, budget=budget)
    if int8 and kv_cache:
        from ..export.onnx_kv import export_kv_onnx

        return export_kv_onnx(model, out, max_length=max_length, force=force, int8={
            "calib": calib, "nsamples": nsamples, "seqlen": calib_seqlen, "percentile": percentile,
            "outlier_ratio": outlier_ratio, "max_error": max_error, "attention": not fp32_attention,
            "head": not fp32_head})
    if int8:
        from ..export.onnx_int8 import OUTLIER_RATIO, export_int8

        return export_int8(model, out, calib=calib, nsamples=nsamples, seqlen=calib_seqlen, percentile=percentile,
                           outlier_ratio=OUTLIER_RATIO if outlier_ratio is None else outlier_ratio,
                           attention=not fp32_attention, logits=logits, trace_seqlen=seqlen, force=force,
                           max_error=max_error, head=not fp32_head)
    if kv_cache:
        from ..export.onnx_kv import export_kv_onnx

        return export_kv_onnx(model, out, max_length=max_length, force=force)
    from ..export.onnx_plain import export_onnx

    export_onnx(model, out, logits=logits, seqlen=seqlen, force=force)
