"""`recover`: distil the dense model into a pruned one with the mask fixed."""

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .app import app


@app.command("recover")
def recover_cmd(
    pruned: str = typer.Argument(..., help="Pruned model folder (written by `prune`)."),
    teacher: str = typer.Option(..., "--teacher", help="The dense model it was pruned from (folder, .gguf, "
                                                       "hub id or 'smollm2')."),
    data: str = typer.Option(..., "--data", help="Training text: c4 | file.txt | file.jsonl | self (the teacher "
                                                 "writes it). Never the evaluation text."),
    out: Path = typer.Option(..., "--out", help="Output folder (a save_pretrained folder with report.md)."),
    tokens: Optional[int] = typer.Option(None, help="Train on this many tokens (sets --steps)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: 200)."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate."),
    batch: int = typer.Option(2, help="Windows per micro-batch, per process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    seqlen: int = typer.Option(512, help="Tokens per training window."),
    kl_weight: float = typer.Option(1.0, help="Weight of KL(teacher || student) on the next token."),
    hidden_weight: float = typer.Option(1.0, help="Weight of the normalized per-layer hidden-state L2 term."),
    warmup: Optional[int] = typer.Option(None, help="Warmup steps (default: 5% of the steps)."),
    checkpoint_every: int = typer.Option(0, help="Save a checkpoint every N steps (0: only when stopped early)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: OUT.ckpt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint (same settings)."),
    wbits_from_recipe: bool = typer.Option(True, "--wbits-from-recipe/--no-grid",
                                           help="Train through the pruned folder's --wbits grid (its recorded "
                                                "scales, fixed) so the written weights stay on it."),
    eval_data: Optional[str] = typer.Option(None, help="Text for perplexity before and after (and held-out KL)."),
    eval_seqlen: int = typer.Option(2048, help="Tokens per perplexity window."),
    max_segments: Optional[int] = typer.Option(4, help="Evaluate at most this many windows."),
    stop_after_steps: Optional[int] = typer.Option(None, help="Stop after this many steps: write the model so "
                                                              "far, keep the checkpoint for --resume."),
    stop_after_cpu_minutes: Optional[float] = typer.Option(None, help="Stop once training has used this many "
                                                                      "CPU-minutes in total (as above)."),
    seed: int = typer.Option(0, help="Seed of the training windows."),
    threads: o.Threads = None,
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto."),
    force: o.Force = False,
):
    """Distil TEACHER into the pruned model with every zero kept (KL + hidden-state loss). Data-parallel under
    torchrun (gloo on CPU, NCCL on CUDA)."""
    from ..recovery.jobs import recover

    recover(pruned, out, teacher, data, steps=steps, tokens=tokens, lr=lr, batch=batch, grad_accum=grad_accum,
            seqlen=seqlen, kl_weight=kl_weight, hidden_weight=hidden_weight, warmup=warmup,
            checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, resume=resume,
            use_grid=wbits_from_recipe, seed=seed, threads=threads, device=device, force=force,
            eval_data=eval_data, eval_seqlen=eval_seqlen, max_segments=max_segments,
            stop_after_steps=stop_after_steps,
            stop_after_cpu_s=stop_after_cpu_minutes * 60 if stop_after_cpu_minutes is not None else None)
