"""`prune` and `eval`."""

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .app import app


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="Hub id, local model folder, .gguf file, or 'smollm2' (the bundled demo)."),
    out: Path = typer.Option(..., "--out", help="Output folder (a save_pretrained folder)."),
    method: o.Method = None,
    sparsity: o.Sparsity = None,
    pattern: o.Pattern = None,
    calib: o.Calib = None,
    nsamples: o.NSamples = None,
    seqlen: o.SeqLen = None,
    seed: o.Seed = None,
    blocksize: o.Blocksize = None,
    dampening: o.Dampening = None,
    ignore: o.Ignore = None,
    wbits: o.WBits = None,
    per_channel: o.PerChannel = None,
    group_size: o.GroupSize = None,
    clip_search: o.ClipSearch = None,
    allocation: o.Allocation = None,
    owl_threshold: o.OwlThreshold = None,
    owl_lambda: o.OwlLambda = None,
    alps_iters: o.AlpsIters = None,
    alps_rho: o.AlpsRho = None,
    alps_rho_growth: o.AlpsRhoGrowth = None,
    alps_cg_iters: o.AlpsCgIters = None,
    smooth: o.Smooth = None,
    recover: o.Recover = None,
    recover_epochs: o.RecoverEpochs = None,
    recover_lr: o.RecoverLr = None,
    recover_batch: o.RecoverBatch = None,
    recover_target: o.RecoverTarget = None,
    threads: o.Threads = None,
    device: o.Device = "cpu",
    stream: o.Stream = None,
    resume: o.Resume = False,
    offload: o.Offload = None,
    activation_budget: o.ActivationBudget = None,
    force: o.Force = False,
):
    """Prune MODEL one-shot and save it as a Hugging Face folder."""
    from ..pruning.jobs import prune
    from ..pruning.recipe import Recipe
    from ..recovery.blockwise import make_hook

    recipe = Recipe(**o.recipe_given(method=method, sparsity=sparsity, pattern=pattern, calib=calib,
                                     nsamples=nsamples, seqlen=seqlen, seed=seed, blocksize=blocksize,
                                     dampening=dampening, ignore=ignore, wbits=wbits, per_channel=per_channel, group_size=group_size, clip_search=clip_search,
                                     allocation=allocation, owl_threshold=owl_threshold, owl_lambda=owl_lambda,
                                     alps_iters=alps_iters, alps_rho=alps_rho, alps_rho_growth=alps_rho_growth,
                                     alps_cg_iters=alps_cg_iters, smooth=smooth))
    hook = make_hook(recover, recipe.validate(), epochs=recover_epochs, lr=recover_lr, batch=recover_batch,
                     target=recover_target)
    prune(model, out, recipe, force=force, threads=threads, device=device, stream=stream, resume=resume,
          offload=offload, activation_budget=o.budget_bytes(activation_budget), after_layer=hook)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Hub id, model folder, .gguf file, or 'smollm2'."),
    data: str = typer.Option("wikitext2", help="wikitext2 | c4 | file.txt | file.jsonl"),
    seqlen: int = typer.Option(2048),
    max_segments: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    threads: o.Threads = None,
    device: o.Device = "cpu",
    stream: o.Stream = None,
    offload: o.Offload = None,
    activation_budget: o.ActivationBudget = None,
):
    """Perplexity of MODEL on DATA (non-overlapping windows of --seqlen tokens)."""
    import torch

    from ..evaluate import evaluate
    from ..outputs import write_json
    from ..report import table

    if threads:
        torch.set_num_threads(threads)
    res = evaluate(model, data, seqlen, max_segments, device=device, stream=stream, offload=offload,
                   activation_budget=o.budget_bytes(activation_budget))
    typer.echo(table([res], [("model", "model"), ("data", "data"), ("windows", "windows"),
                             ("tokens", "tokens"), ("perplexity", "perplexity")]))
    if json_out:
        write_json(json_out, res)
