"""Distillation of a pruned model from its dense teacher, with the mask fixed.

Loss = kl_weight * KL(teacher || student) on the next-token distribution
     + hidden_weight * mean over layers of ||h_s - h_t||^2 / ||h_t||^2 per token (SquareHead-like).
AdamW, linear warmup then cosine decay to a tenth of the rate, gradient accumulation, activation
checkpointing, bf16 autocast on CUDA. Data-parallel through torch.distributed (DDP) when the process group is
up: each rank reads its own slice of every global batch. A checkpoint (safetensors weights and AdamW state,
JSON progress) every N steps; resuming from it continues bit-identically at the same thread count."""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..progress import progress

CHECKPOINT_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"


@dataclass
class DistillConfig:
    steps: int
    lr: float = 1e-4
    batch: int = 2              # windows per micro-batch and process
    grad_accum: int = 1
    seqlen: int = 512
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    warmup: int = 0             # steps of linear warmup
    checkpoint_every: int = 0   # 0: only when stopped early
    seed: int = 0
    world: int = 1              # processes (data-parallel)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def windows_needed(self) -> int:
        return self.steps * self.grad_accum * self.global_batch

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (the world size may change, the global batch not)."""
        d = asdict(self)
        for k in ("checkpoint_every", "world", "batch"):
            d.pop(k)
        d["global_batch"] = self.global_batch
        return d


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay to lr / 10."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def distill_loss(student_out, teacher_out, kl_weight: float, hidden_weight: float) -> tuple[torch.Tensor, dict]:
    """(loss, {"kl", "hidden"}) from two model outputs with logits and hidden states."""
    s_lp = F.log_softmax(student_out.logits.float(), dim=-1)
    t_lp = F.log_softmax(teacher_out.logits.float(), dim=-1)
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
    hidden = kl.new_zeros(())
    if hidden_weight:
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
        for hs, ht in pairs:
            hs, ht = hs.float(), ht.float()
            hidden = hidden + (((hs - ht) ** 2).sum(-1) / (ht ** 2).sum(-1).clamp_min(1e-6)).mean()
        hidden = hidden / max(1, len(pairs))
    loss = kl_weight * kl + hidden_weight * hidden
    return loss, {"kl": float(kl.detach()), "hidden": float(hidden.detach())}


def no_dropout(model) -> None:
    """Zero every dropout (modules and the float rates some attention code reads), so train mode (which
    activation checkpointing needs) computes what eval mode does."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        for attr, val in list(vars(mod).items()):
            if "dropout" in attr and isinstance(val, float):
                setattr(mod, attr, 0.0)


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters that train: everything but the token embeddings and the LM head."""
    frozen = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None and getattr(m, "weight", None) is not None}
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            out.append((name, p))
    return out


def _checkpointing(model, on: bool) -> None:
    """Activation checkpointing on or off (transformers 5 renamed gradient_checkpointing_*)."""
    new = hasattr(model, "activation_checkpointing_enable")
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    if on:
        getattr(model, name + "_enable")(**{name + "_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, name + "_disable")()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def save_checkpoint(folder: Path, params, opt, step: int, record: dict) -> None:
    """Weights and AdamW state (safetensors), then progress (JSON); each file replaced atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in params:
        tensors[f"param.{name}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        if st:
            tensors[f"exp_avg.{name}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous()
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / CHECKPOINT_FILE)
    tmp = folder / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({**record, "step": step}, indent=2))
    os.replace(tmp, folder / PROGRESS_FILE)


def load_checkpoint(folder: Path, params, opt, fingerprint: dict) -> dict:
    """Restore weights and AdamW state saved by save_checkpoint; returns the progress record."""
    from safetensors.torch import load_file

    prog = folder / PROGRESS_FILE
    if not prog.is_file() or not (folder / CHECKPOINT_FILE).is_file():
        raise UserError(f"--resume: no checkpoint in {folder}")
    record = json.loads(prog.read_text())
    if record.get("config") != fingerprint:
        changed = sorted(k for k in fingerprint if (record.get("config") or {}).get(k) != fingerprint[k])
        raise UserError(f"--resume: the checkpoint in {folder} was made with other settings ({', '.join(changed)})")
    tensors = load_file(str(folder / CHECKPOINT_FILE))
    step = record["step"]
    with torch.no_grad():
        for name, p in params:
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(step)),
                                "exp_avg": tensors[f"exp_avg.{name}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device)}
    return record


def train(student, teacher, windows: torch.Tensor, cfg: DistillConfig, checkpoint_dir=None, resume: bool = False,
          stop_cpu_s: float | None = None, stop_step: int | None = None, show_progress: bool = True) -> dict:
    """Distil `teacher` into `student` (already masked: masks.fix_masks) on `windows` [n, seqlen].

    Rank r of a process group reads rows r*batch:(r+1)*batch of each global batch; gradients are averaged
    by DDP. stop_cpu_s: stop (with a checkpoint) once this many CPU seconds of training have been spent in
    total; stop_step: stop (with a checkpoint) after this many steps. Returns {"history", "steps_done", "tokens", "cpu_s", "wall_s", "finished"}."""
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    dev = next(student.parameters()).device
    params = trainable(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.config.use_cache = False
    student.train()
    no_dropout(student)
    _checkpointing(student, True)
    model = student
    if dist:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=False)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    record = {"config": cfg.fingerprint(), "history": [], "cpu_s": 0.0, "wall_s": 0.0, "step": 0}
    if resume:
        record = load_checkpoint(ckpt, params, opt, cfg.fingerprint())
    start, wall0 = record["step"], record["wall_s"]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())
    tokens_per_step = cfg.global_batch * cfg.grad_accum * cfg.seqlen
    finished = True
    with progress(cfg.steps, "distilling", unit="step", enabled=show_progress and rank == 0, initial=start) as bar:
        for step in range(start, cfg.steps):
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, dtype=torch.float64)
            for a in range(cfg.grad_accum):
                first = (step * cfg.grad_accum + a) * cfg.global_batch + rank * cfg.batch
                ids = windows[first:first + cfg.batch].to(dev)
                sync = contextlib.nullcontext() if (not dist or a == cfg.grad_accum - 1) else model.no_sync()
                with sync:
                    with torch.no_grad(), autocast:
                        t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=bool(cfg.hidden_weight))
                    with autocast:
                        s_out = model(input_ids=ids, use_cache=False, output_hidden_states=bool(cfg.hidden_weight))
                        loss, parts = distill_loss(s_out, t_out, cfg.kl_weight, cfg.hidden_weight)
                    (loss / cfg.grad_accum).backward()
                sums += torch.tensor([float(loss.detach()), parts["kl"], parts["hidden"]], dtype=torch.float64)
                del t_out, s_out, loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            sums /= cfg.grad_accum
            if dist:
                dist.all_reduce(sums)
                sums /= dist.get_world_size()
            cpu = time.process_time() - t_cpu
            if dist:      # CPU time of all processes together
                c = torch.tensor([cpu], dtype=torch.float64)
                dist.all_reduce(c)
                cpu = float(c)
            record["cpu_s"] += cpu
            record["wall_s"] += time.perf_counter() - t_wall
            record["history"].append({"step": step + 1, "loss": float(sums[0]), "kl": float(sums[1]),
                                      "hidden": float(sums[2]), "lr": lr, "tokens": (step + 1) * tokens_per_step,
                                      "cpu_s": round(record["cpu_s"], 3), "wall_s": round(record["wall_s"], 3)})
            rate = tokens_per_step * (step + 1 - start) / max(1e-9, record["wall_s"] - wall0)
            bar.set_postfix_str(f"loss {float(sums[0]):.4f}, {rate:.0f} tok/s")
            bar.update(1)
            done = step + 1
            stop = done < cfg.steps and ((stop_cpu_s is not None and record["cpu_s"] >= stop_cpu_s)
                                         or (stop_step is not None and done >= stop_step))
            if ckpt and rank == 0 and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stop):
                save_checkpoint(ckpt, params, opt, done, record)
            record["step"] = done
            if stop:
                finished = False
                break
    if dist:
        dist.barrier()
    _checkpointing(student, False)
    student.eval()
    return {"history": record["history"], "steps_done": record["step"], "tokens": record["step"] * tokens_per_step,
            "cpu_s": record["cpu_s"], "wall_s": record["wall_s"], "finished": finished}
