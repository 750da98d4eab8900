"""The `recover` job: load the pruned student and the dense teacher, distil with the mask fixed, write the
recovered model folder with a before/after report."""

import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import accuracy, data, models
from ..errors import UserError
from ..layerwise import pick_device
from ..outputs import META_FILE, Timer, atomic_dir, peak_rss_gib, read_meta, write_json
from ..report import table
from .distill import DistillConfig, train
from .masks import bake, fix_masks, grid_scales, zero_counts, zero_masks
from .train_data import check_training_source, training_windows

DEFAULT_STEPS = 200
HELD_OUT_WINDOWS = 4


def _writable(path: Path, what: str) -> None:
    """UserError unless `path` can be created (its nearest existing ancestor is a writable folder)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {p} is not a writable folder")


def check_pair(student, teacher, s_tok, t_tok, teacher_spec) -> None:
    """The teacher must be the student's dense twin: same architecture, vocabulary and tensor shapes."""
    if student.config.model_type != teacher.config.model_type:
        raise UserError(f"teacher {teacher_spec} is a {teacher.config.model_type}, the student a "
                        f"{student.config.model_type}")
    if len(s_tok) != len(t_tok) or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"teacher {teacher_spec} has another vocabulary ({teacher.config.vocab_size} vs "
                        f"{student.config.vocab_size} tokens)")
    t_shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    for k, v in student.state_dict().items():
        if t_shapes.get(k, tuple(v.shape)) != tuple(v.shape) or k not in t_shapes:
            raise UserError(f"teacher {teacher_spec} has another shape: {k} is {t_shapes.get(k)} there, "
                            f"{tuple(v.shape)} in the student")


def _init_dist(device: str):
    """Join the torchrun process group when launched by it: (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def _measure(model, tokenizer, held_out, teacher_lp, eval_windows) -> dict:
    out = accuracy.distribution_shift(teacher_lp, accuracy.next_token_logprobs(model, held_out))
    if eval_windows is not None:
        from ..evaluate import perplexity

        out["perplexity"] = perplexity(model, eval_windows, progress=False)[0]
    out["completions"] = accuracy.greedy_completions(model, tokenizer)
    return out


def recover(pruned, out, teacher_spec, source, steps: int | None = None, tokens: int | None = None,
            lr: float = 1e-4, batch: int = 2, grad_accum: int = 1, seqlen: int = 512, kl_weight: float = 1.0,
            hidden_weight: float = 1.0, warmup: int | None = None, checkpoint_every: int = 0,
            checkpoint_dir=None, resume: bool = False, use_grid: bool = True, seed: int = 0,
            threads: int | None = None, device: str = "cpu", force: bool = False, eval_data: str | None = None,
            eval_seqlen: int = 2048, max_segments: int | None = 4, stop_after_steps: int | None = None,
            stop_after_cpu_s: float | None = None, log=print) -> dict:
    """Distil the dense `teacher_spec` into the pruned folder `pruned`; write the recovered folder `out`.

    Returns the report (also written to out/report.json and report.md). Stopped early (stop_after_*), the
    model so far is written and the checkpoint kept for --resume."""
    out = Path(out)
    kind, where = models.resolve(pruned)
    if kind != "folder":
        raise UserError(f"{pruned}: recover takes a pruned model folder (written by `prune`)")
    meta = read_meta(where)
    if meta.get("kind") not in ("pruned-model", "recovered-model") or "matrices" not in meta:
        raise UserError(f"{pruned} is not a pruned model folder (no {META_FILE} from `prune`)")
    models.check_model(teacher_spec)
    check_training_source(source, eval_data)
    if eval_data:
        data.check_source(eval_data)
    if steps is not None and tokens is not None:
        raise UserError("give --steps or --tokens, not both")
    if min(batch, grad_accum) < 1 or seqlen < 2 or lr <= 0 or (steps is not None and steps < 1) \
            or (tokens is not None and tokens < 1) or min(kl_weight, hidden_weight) < 0 or kl_weight + hidden_weight == 0:
        raise UserError("--batch, --grad-accum, --steps, --tokens must be >= 1, --seqlen >= 2, --lr > 0, "
                        "loss weights >= 0 and not both 0")
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to overwrite)")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    _writable(out, "--out")
    _writable(ckpt, "the checkpoint folder")
    if resume and not (ckpt / "progress.json").is_file():
        raise UserError(f"--resume: no checkpoint in {ckpt}")
    rank, world = _init_dist(device)
    try:
        return _recover(rank, world, where, meta, out, ckpt, pruned, teacher_spec, source, steps, tokens, lr, batch,
                        grad_accum, seqlen, kl_weight, hidden_weight, warmup, checkpoint_every, resume, use_grid,
                        seed, threads, device, force, eval_data, eval_seqlen, max_segments, stop_after_steps,
                        stop_after_cpu_s, log if rank == 0 else (lambda *a: None))
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _recover(rank, world, where, meta, out, ckpt, pruned, teacher_spec, source, steps, tokens, lr, batch,
             grad_accum, seqlen, kl_weight, hidden_weight, warmup, checkpoint_every, resume, use_grid, seed,
             threads, device, force, eval_data, eval_seqlen, max_segments, stop_after_steps, stop_after_cpu_s,
             log) -> dict:
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if threads:
        torch.set_num_threads(threads)
    t_start, c_start = time.perf_counter(), time.process_time()

    student, tokenizer = models.load_model(where)
    teacher, t_tok = models.load_model(teacher_spec)
    stored_dtype = student.dtype
    student, teacher = student.float().to(dev), teacher.float().to(dev)
    check_pair(student, teacher, tokenizer, t_tok, teacher_spec)
    names = models.prunable_names(student)
    masks = zero_masks(student, names)
    zeros_before = zero_counts({n: student.get_submodule(n) for n in names})
    if sum(zeros_before.values()) == 0:
        raise UserError(f"{pruned} has no zero weights: it is not pruned")
    recipe = meta.get("recipe") or {}
    scales = {k: v.to(dev) for k, v in grid_scales(meta, student, names).items()} if use_grid else {}

    if tokens is not None:
        steps = math.ceil(tokens / (batch * world * grad_accum * seqlen))
    steps = steps or DEFAULT_STEPS
    cfg = DistillConfig(steps=steps, lr=lr, batch=batch, grad_accum=grad_accum, seqlen=seqlen, kl_weight=kl_weight,
                        hidden_weight=hidden_weight, warmup=warmup if warmup is not None else max(1, steps // 20),
                        checkpoint_every=checkpoint_every, seed=seed, world=world)
    windows = training_windows(source, t_tok, cfg.windows_needed(), seqlen, seed, teacher=teacher)
    held_out = eval_windows = teacher_lp = before = None
    if rank == 0:
        if eval_data:
            eval_windows = data.eval_windows(eval_data, tokenizer, eval_seqlen, max_segments)
        held_src = eval_data or source
        held_out = (eval_windows[:, :min(eval_seqlen, 512)][:HELD_OUT_WINDOWS] if eval_windows is not None else
                    training_windows(source, t_tok, HELD_OUT_WINDOWS, min(seqlen, 512), seed + 7919, teacher=teacher))
        teacher_lp = accuracy.next_token_logprobs(teacher, held_out.to(dev))
        before = _measure(student, tokenizer, held_out.to(dev), teacher_lp, eval_windows)
        log(f"before: KL {before['kl_nats_per_token']:.4f} nats/token, top-1 agreement {before['top1_agreement']:.3f}"
            + (f", perplexity {before['perplexity']:.2f}" if "perplexity" in before else ""))

    fix_masks(student, masks, scales, recipe.get("wbits") if scales else None)
    log(f"distilling {steps} steps x {cfg.global_batch * grad_accum} windows x {seqlen} tokens "
        f"({world} process{'es' if world > 1 else ''}, {'grid ' + str(recipe.get('wbits')) + '-bit, ' if scales else ''}"
        f"data {source})")
    run = train(student, teacher, windows, cfg, ckpt, resume, stop_cpu_s=stop_after_cpu_s, stop_step=stop_after_steps)
    bake(student, names)
    zeros_after = zero_counts({n: student.get_submodule(n) for n in names})
    moved = [n for n in names if zeros_after[n] != zeros_before[n]]
    if moved:
        raise RuntimeError(f"the mask moved in {moved[:3]}")
    if rank != 0:
        return {}

    after = _measure(student, tokenizer, held_out.to(dev), teacher_lp, eval_windows)
    report = {
        "pruned": str(pruned), "teacher": str(teacher_spec), "data": str(source), "steps": run["steps_done"],
        "steps_planned": steps, "finished": run["finished"], "tokens": run["tokens"],
        "train_cpu_s": run["cpu_s"], "train_wall_s": run["wall_s"],
        "wall_s": time.perf_counter() - t_start, "cpu_s_this_process": time.process_time() - c_start,
        "peak_memory_gib": peak_rss_gib(), "processes": world, "device": str(dev),
        "held_out": {"source": str(eval_data or source), "windows": int(held_out.shape[0]),
                     "tokens_each": int(held_out.shape[1])},
        "eval": {"data": eval_data, "seqlen": eval_seqlen, "windows": int(eval_windows.shape[0])} if eval_data else None,
        "before": before, "after": after, "prompts": list(accuracy.PROMPTS),
    }
    stats = meta.get("matrices") or {}
    total = 0
    for n in names:
        w = models.weight_2d(student.get_submodule(n))
        stats.setdefault(n, {"shape": list(w.shape)})["sparsity"] = zeros_after[n] / w.numel()
        total += w.numel()
    recovered_meta = {**meta, "kind": "recovered-model", "matrices": stats,
                      "pruned_sparsity": sum(zeros_after.values()) / max(total, 1),
                      "recovery": {"method": "distill", "data": str(source), "tokens": run["tokens"],
                                   "steps": run["steps_done"], "steps_planned": steps, "finished": run["finished"],
                                   "seed": seed, "lr": lr, "batch": batch, "processes": world,
                                   "grad_accum": grad_accum, "seqlen": seqlen, "warmup": cfg.warmup,
                                   "kl_weight": kl_weight, "hidden_weight": hidden_weight,
                                   "teacher": str(teacher_spec), "from": str(pruned),
                                   "grid": bool(scales), "train_cpu_s": run["cpu_s"], "train_wall_s": run["wall_s"]}}
    student = student.to("cpu").to(stored_dtype)
    with atomic_dir(out, force) as tmp:
        models.save_model_folder(student, tokenizer, tmp, recovered_meta)
        write_json(tmp / "loss_curve.json", run["history"])
        _plot_loss(run["history"], tmp / "loss_curve.png")
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report))
    if run["finished"] and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
    elif not run["finished"]:
        log(f"stopped after {run['steps_done']} of {steps} steps; continue with --resume (checkpoint: {ckpt})")
    log(f"after: KL {after['kl_nats_per_token']:.4f} nats/token, top-1 agreement {after['top1_agreement']:.3f}"
        + (f", perplexity {after['perplexity']:.2f}" if "perplexity" in after else ""))
    log(f"trained on {run['tokens']} tokens in {run['wall_s']:.0f}s wall / {run['cpu_s']:.0f}s CPU; "
        f"peak memory {report['peak_memory_gib']:.2f} GiB; wrote {out}")
    return report


def report_markdown(r: dict) -> str:
    """report.md: before and after side by side."""
    b, a = r["before"], r["after"]
    rows = [{"measure": "KL to teacher (nats/token)", "one-shot": b["kl_nats_per_token"], "recovered": a["kl_nats_per_token"]},
            {"measure": "top-1 agreement", "one-shot": b["top1_agreement"], "recovered": a["top1_agreement"]}]
    if "perplexity" in b:
        rows.insert(0, {"measure": f"perplexity ({r['eval']['data']})", "one-shot": b["perplexity"],
                        "recovered": a["perplexity"]})
    cols = [("measure", "measure"), ("one-shot", "one-shot"), ("recovered", "recovered")]
    comp = [{"prompt": p, "one-shot": x, "recovered": y} for p, x, y in zip(r["prompts"], b["completions"], a["completions"])]
    return (f"# Recovery by distillation: {r['pruned']} from {r['teacher']}\n\n"
            f"Data {r['data']}; {r['steps']} steps ({'finished' if r['finished'] else 'stopped early'}), "
            f"{r['tokens']} tokens, {r['train_wall_s']:.0f}s wall / {r['train_cpu_s']:.0f}s CPU of training, "
            f"{r['processes']} process(es) on {r['device']}, peak memory {r['peak_memory_gib']:.2f} GiB (this process).\n"
            f"KL and top-1 on {r['held_out']['windows']} x {r['held_out']['tokens_each']} held-out tokens of "
            f"{r['held_out']['source']}.\n\n" + table(rows, cols) + "\n\nGreedy completions:\n\n"
            + table(comp, [("prompt", "prompt"), ("one-shot", "one-shot"), ("recovered", "recovered")]) + "\n")


def _plot_loss(history: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "kl", "hidden"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
