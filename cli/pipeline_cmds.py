"""`prune-and-export`."""

from pathlib import Path
from typing import List, Optional

import typer

from .app import app


@app.command("prune-and-export")
def prune_and_export_cmd(
    model: str = typer.Argument(..., help="Hub id, local model folder, .gguf file, or 'smollm2'."),
    out: Path = typer.Option(..., "--out", help="Output folder (models, deployments, report)."),
    target: str = typer.Option("cpu", help="cpu: sparse ONNX for DeepSparse | gpu: 2:4 compressed-tensors."),
    sparsity: float = typer.Option(0.5, help="Fraction of weights pruned (cpu target)."),
    pattern: Optional[str] = typer.Option(None, help="n:m pattern (gpu target default 2:4; cpu: overrides --sparsity)."),
    calib: str = typer.Option("c4", help="wikitext2 | c4 | file.txt | file.jsonl | self"),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    eval_data: Optional[str] = typer.Option(None, help="Text for perplexity before and after (and the checks)."),
    eval_seqlen: int = typer.Option(2048, help="Tokens per perplexity window."),
    max_segments: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    runtime: List[str] = typer.Option([], help="Runtimes to verify and benchmark (cpu; default: all installed)."),
    bench_batch: int = typer.Option(1, help="Benchmark batch."),
    bench_seqlen: int = typer.Option(400, help="Benchmark tokens per sequence."),
    iterations: int = typer.Option(20, help="Timed benchmark runs (cpu)."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: all cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    int8: bool = typer.Option(False, "--int8", help="cpu: also prune onto the int8 grid and export onnx-int8/."),
    fp32_attention: bool = typer.Option(False, "--fp32-attention",
                                        help="With --int8: keep the attention score matmuls fp32."),
    generate: bool = typer.Option(True, "--generate/--no-generate",
                                  help="cpu: also export KV-cache graphs and benchmark generation."),
    prompt_tokens: int = typer.Option(256, help="cpu, generation benchmark: prompt length."),
    new_tokens: int = typer.Option(128, help="cpu, generation benchmark: tokens generated."),
):
    """Prune MODEL with SparseGPT, export, verify, benchmark, and write report.md."""
    from sparse_export.errors import UserError
    from sparse_export.pipeline import prune_and_export

    common = dict(pattern=pattern, calib=calib, nsamples=nsamples, seqlen=seqlen, eval_data=eval_data,
                  eval_seqlen=eval_seqlen, max_segments=max_segments, bench_batch=bench_batch,
                  bench_seqlen=bench_seqlen, threads=threads, force=force, int8=int8)
    if fp32_attention:
        common["fp32_attention"] = True
    if target == "cpu":
        common.update(sparsity=sparsity, runtimes=list(runtime) or None, iterations=iterations,
                      generate=generate, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    elif target == "gpu":
        if runtime:
            raise UserError("--runtime applies to the cpu target only")
        common["pattern"] = pattern or "2:4"
    prune_and_export(model, out, target=target, **common)
