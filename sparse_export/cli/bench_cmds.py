"""`benchmark`."""

from pathlib import Path
from typing import List, Optional

import typer

from ..runtimes import CPU_RUNTIMES, RUNTIMES
from . import options as o
from .app import app


@app.command("benchmark")
def benchmark_cmd(
    model: Path = typer.Argument(..., help="Deployment folder (from `export onnx`) or model folder."),
    baseline: Optional[Path] = typer.Option(None, help="The dense deployment/model folder to compare with."),
    runtime: List[str] = typer.Option([], help=f"{' | '.join(RUNTIMES)} (repeatable; default: the installed "
                                               f"CPU engines, {', '.join(CPU_RUNTIMES)})."),
    batch: int = typer.Option(1),
    seqlen: int = typer.Option(400, help="Tokens per sequence."),
    warmup: int = typer.Option(3, help="Untimed runs first."),
    iterations: int = typer.Option(20, help="Timed runs."),
    threads: o.Threads = None,
    logits: str = typer.Option("last", help="Variant used when a model folder is exported on the fly."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw a PNG bar chart of latency here."),
    mode: str = typer.Option("prefill", help="prefill | generate (KV-cache folders, or model folders on "
                                             "sparse-cpu / sparse-cpu-dense; --warmup/--iterations then "
                                             "count whole generations, e.g. --iterations 3)."),
    prompt_tokens: int = typer.Option(256, help="--mode generate: prompt length."),
    new_tokens: int = typer.Option(128, help="--mode generate: tokens generated per run."),
):
    """Latency of a forward pass over --batch x --seqlen tokens, per runtime, and the speedup over --baseline."""
    folders = {"model": model, **({"baseline": baseline} if baseline else {})}
    log = (lambda msg: typer.echo(msg, err=True))
    # an engine that crashes (DeepSparse 1.8 on some graphs) is retried once on one thread, else one line
    if mode != "prefill":
        from ..measure.generation import run_cli

        return run_cli(mode, folders, runtime, prompt_tokens, new_tokens, warmup, iterations, threads, json_out, plot,
                       on_crash="retry", log=log)
    from ..measure.prefill import benchmark_prefill, prefill_table, save_prefill

    result = benchmark_prefill(folders, runtime or None, baseline="baseline" if baseline else None, batch=batch,
                               seqlen=seqlen, warmup=warmup, iterations=iterations, threads=threads, logits=logits,
                               on_crash="retry", log=log)
    typer.echo(prefill_table(result))
    save_prefill(result, json_out, plot)
