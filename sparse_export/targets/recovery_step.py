"""`--recover distill` as a step of either target: the one-shot folder in, the distilled folder out."""

from pathlib import Path

from .options import RecoverOptions

REPORTED = ("data", "steps", "tokens", "train_cpu_s", "train_wall_s", "peak_memory_gib")


def distill(model: str, oneshot: Path, out: Path, opts: RecoverOptions, checkpoint_dir: Path, log) -> dict:
    """Distil `model` (the dense teacher) into the pruned `oneshot` folder with the mask fixed, written to
    `out`. Returns what the report keeps of the run."""
    from ..recovery.jobs import recover

    source, steps, lr = opts.distill_settings()
    log(f"recovering: distillation from {model} on {source}, {steps} steps")
    rep = recover(oneshot, out, model, source, steps=steps, lr=lr, seed=opts.recipe.seed, threads=opts.threads,
                  checkpoint_dir=checkpoint_dir, log=log)
    return {k: rep[k] for k in REPORTED}
