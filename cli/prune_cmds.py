"""`prune` and `eval`."""

from pathlib import Path
from typing import List, Optional

import typer

from .app import app


@app.command()
def prune(
    model: str = typer.Argument(..., help="Hub id, local model folder, .gguf file, or 'smollm2' (the bundled demo)."),
    out: Path = typer.Option(..., "--out", help="Output folder (a save_pretrained folder)."),
    method: str = typer.Option("sparsegpt", help="sparsegpt | wanda | magnitude"),
    sparsity: float = typer.Option(0.5, help="Fraction of weights pruned (unstructured)."),
    pattern: Optional[str] = typer.Option(None, help="n:m semi-structured pattern, e.g. 2:4 (overrides --sparsity)."),
    calib: str = typer.Option("c4", help="wikitext2 | c4 | file.txt | file.jsonl | self"),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0),
    blocksize: int = typer.Option(128, help="Columns per lazy-update block."),
    dampening: float = typer.Option(0.01, help="Hessian dampening, fraction of its mean diagonal."),
    ignore: List[str] = typer.Option([], help="Regex of module names to leave dense (repeatable)."),
    wbits: Optional[int] = typer.Option(None, help="Also quantize kept weights to this many bits, in the same sweep."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Quantization scale granularity."),
    threads: Optional[int] = typer.Option(None, help="Torch threads (default: all cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
):
    """Prune MODEL one-shot and save it as a Hugging Face folder."""
    from sparse_export.jobs import prune as run_prune
    from sparse_export.prune import Recipe

    recipe = Recipe(method=method, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples,
                    seqlen=seqlen, seed=seed, blocksize=blocksize, dampening=dampening,
                    ignore=list(ignore), wbits=wbits, per_channel=per_channel)
    run_prune(model, out, recipe, force=force, threads=threads)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Hub id, model folder, .gguf file, or 'smollm2'."),
    data: str = typer.Option("wikitext2", help="wikitext2 | c4 | file.txt | file.jsonl"),
    seqlen: int = typer.Option(2048),
    max_segments: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    threads: Optional[int] = typer.Option(None),
):
    """Perplexity of MODEL on DATA (non-overlapping windows of --seqlen tokens)."""
    import torch

    from sparse_export.jobs import dump, evaluate, format_table

    if threads:
        torch.set_num_threads(threads)
    res = evaluate(model, data, seqlen, max_segments)
    typer.echo(format_table([res], [("model", "model"), ("data", "data"), ("windows", "windows"),
                                    ("tokens", "tokens"), ("perplexity", "perplexity")]))
    if json_out:
        dump(res, json_out)
