"""`prune-and-export`: parses, builds the target's options object, runs its pipeline."""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..targets.options import default
from . import options as o
from .app import app


def _target_opt(name: str, help: str, *decls: str, cpu: bool = True, gpu: bool = True):
    """Help with the default of each target that takes the option (targets.options holds them)."""
    shown = [f"{t}: {default(t, name)}" for t, on in (("cpu", cpu), ("gpu", gpu)) if on]
    note = f" (default {'; '.join(shown)})" if shown else ""
    return typer.Option(*decls, help=help + note, show_default=False)


CpuOnly = {"gpu": False}


@app.command("prune-and-export")
def prune_and_export_cmd(
    model: str = typer.Argument(..., help="Hub id, local model folder, .gguf file, or 'smollm2'."),
    out: Path = typer.Option(..., "--out", help="Output folder (models, deployments, report)."),
    target: str = typer.Option("cpu", help="cpu: sparse ONNX for DeepSparse | gpu: 2:4 compressed-tensors."),
    method: o.Method = None,
    sparsity: Annotated[Optional[float], _target_opt("sparsity", "Fraction of weights pruned (cpu target).",
                                                      **CpuOnly)] = None,
    pattern: Annotated[Optional[str], _target_opt("pattern", "n:m pattern (cpu: overrides --sparsity).")] = None,
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
    eval_data: Annotated[Optional[str], _target_opt("eval_data", "Text for perplexity before and after "
                                                                 "(and the checks).")] = None,
    eval_seqlen: Annotated[Optional[int], _target_opt("eval_seqlen", "Tokens per perplexity window.")] = None,
    max_segments: Annotated[Optional[int], _target_opt("max_segments", "Evaluate at most this many windows.")] = None,
    runtime: Annotated[Optional[List[str]], _target_opt("runtimes", "Runtimes to verify and benchmark "
                                                        "(cpu; default: all installed).", gpu=False)] = None,
    bench_batch: Annotated[Optional[int], _target_opt("bench_batch", "Benchmark batch.")] = None,
    bench_seqlen: Annotated[Optional[int], _target_opt("bench_seqlen", "Benchmark tokens per sequence.")] = None,
    warmup: Annotated[Optional[int], _target_opt("warmup", "Untimed benchmark runs first.")] = None,
    iterations: Annotated[Optional[int], _target_opt("iterations", "Timed benchmark runs.")] = None,
    logits: Annotated[Optional[str], _target_opt("logits", "Graph output: last | all | none (cpu).",
                                                 **CpuOnly)] = None,
    threads: o.Threads = None,
    force: o.Force = False,
    int8: Annotated[Optional[bool], _target_opt("int8", "cpu: also prune onto the int8 grid and export onnx-int8/.",
                                                "--int8", **CpuOnly)] = None,
    fp32_attention: Annotated[Optional[bool], _target_opt("fp32_attention", "With --int8: keep the attention "
                                                          "score matmuls fp32.", "--fp32-attention", **CpuOnly)] = None,
    int8_max_error: Annotated[Optional[float], _target_opt("int8_max_error", "With --int8: also keep fp32 each "
                                                           "Linear layer whose output its int8 input changes by "
                                                           "more than this relative squared error (e.g. 0.003).",
                                                           **CpuOnly)] = None,
    generate: Annotated[Optional[bool], _target_opt("generate", "cpu: also export KV-cache graphs and benchmark "
                                                    "generation.", "--generate/--no-generate", **CpuOnly)] = None,
    prompt_tokens: Annotated[Optional[int], _target_opt("prompt_tokens", "cpu, generation benchmark: prompt length.",
                                                        **CpuOnly)] = None,
    new_tokens: Annotated[Optional[int], _target_opt("new_tokens", "cpu, generation benchmark: tokens generated.",
                                                     **CpuOnly)] = None,
    stream: Annotated[Optional[bool], _target_opt("stream", "cpu: prune and export one decoder layer at a time "
                                                  "from the safetensors shards (default: each step streams "
                                                  "when the model would not fit; docs/export-at-scale.md).",
                                                  "--stream/--no-stream", cpu=False, gpu=False)] = None,
    memory_budget: Annotated[Optional[float], _target_opt("memory_budget", "cpu: GiB the in-memory export may "
                                                          "use; larger safetensors folders take the streamed "
                                                          "path (default 8).", cpu=False, gpu=False)] = None,
    skip_fp32: Annotated[Optional[bool], _target_opt("skip_fp32", "cpu, with --int8: leave out the fp32 ONNX "
                                                     "graphs (dense and sparse); export and benchmark INT8 only.",
                                                     "--skip-fp32", **CpuOnly)] = None,
    recover_data: Annotated[Optional[str], _target_opt("recover_data", "--recover distill: training text "
                                                       "(c4 | file.txt | file.jsonl | self; default: --calib)."
                                                       )] = None,
    recover_steps: Annotated[Optional[int], _target_opt("recover_steps", "--recover distill: optimizer steps."
                                                        )] = None,
):
    """Prune MODEL (SparseGPT by default), export, verify, benchmark, and write report.md."""
    from ..targets import prune_and_export
    from ..targets.options import build_options

    opts = build_options(
        target, **o.recipe_given(method=method, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples,
                                 seqlen=seqlen, seed=seed, blocksize=blocksize, dampening=dampening, ignore=ignore,
                                 wbits=wbits, per_channel=per_channel, group_size=group_size, clip_search=clip_search, allocation=allocation,
                                 owl_threshold=owl_threshold, owl_lambda=owl_lambda, alps_iters=alps_iters,
                                 alps_rho=alps_rho, alps_rho_growth=alps_rho_growth, alps_cg_iters=alps_cg_iters,
                                 smooth=smooth),
        eval_data=eval_data, eval_seqlen=eval_seqlen, max_segments=max_segments,
        runtimes=list(runtime) if runtime else None, bench_batch=bench_batch, bench_seqlen=bench_seqlen,
        warmup=warmup, iterations=iterations, logits=logits, threads=threads, force=force or None, int8=int8,
        fp32_attention=fp32_attention, int8_max_error=int8_max_error, generate=generate, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, stream=stream, memory_budget=memory_budget, skip_fp32=skip_fp32,
        recover=recover, recover_epochs=recover_epochs, recover_lr=recover_lr, recover_batch=recover_batch,
        recover_target=recover_target, recover_data=recover_data, recover_steps=recover_steps)
    prune_and_export(model, out, opts)
