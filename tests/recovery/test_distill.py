"""Distillation with the mask fixed: zeros kept on every architecture, the loss falls, resume equals an
uninterrupted run, the grid is kept, two gloo processes equal one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sparse_export import data, models
from sparse_export.outputs import read_meta
from sparse_export.pruning.grid import int_weight
from sparse_export.recovery.distill import DistillConfig, distill_loss, lr_at, train
from sparse_export.recovery.masks import fix_masks, zero_masks
from sparse_export.recovery.jobs import recover
from tests.recovery.conftest import pruned_copy
from tests.tiny import ARCHS

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(log=lambda *a: None, threads=1, seqlen=32, batch=2, max_segments=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def _zeros(folder) -> dict:
    model, _ = models.load_model(folder)
    return {n: int((models.weight_2d(model.get_submodule(n)) == 0).sum()) for n in models.prunable_names(model)}


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_count_of_every_matrix_kept(arch, tiny_dirs, tmp_path, text_file, no_threads):
    pruned = pruned_copy(tiny_dirs[arch], tmp_path / "pruned", text_file)
    out = tmp_path / "rec"
    recover(pruned, out, tiny_dirs[arch], str(text_file), steps=3, lr=1e-2, **QUIET)
    before, after = _zeros(pruned), _zeros(out)
    assert before == after and sum(before.values()) > 0
    w0, w1 = _weights(pruned), _weights(out)
    changed = [k for k in w0 if k in w1 and not torch.equal(w0[k], w1[k])]
    assert changed, "training moved no weight"
    meta = read_meta(out)
    assert meta["recovery"]["method"] == "distill" and meta["recovery"]["steps"] == 3
    assert meta["recipe"] == read_meta(pruned)["recipe"]
    assert abs(meta["pruned_sparsity"] - read_meta(pruned)["pruned_sparsity"]) < 1e-9


def test_loss_falls(pruned_llama, tiny_dirs, text_file, no_threads):
    """The same two windows every step: the distillation loss on them must fall well below its start."""
    student, tok = models.load_model(pruned_llama)
    teacher, _ = models.load_model(tiny_dirs["llama"])
    names = models.prunable_names(student)
    fix_masks(student, zero_masks(student, names), {}, None)
    ids = data.calibration_windows(str(text_file), tok, 2, 32, 0)
    cfg = DistillConfig(steps=40, lr=3e-3, batch=2, seqlen=32, warmup=2)
    run = train(student, teacher, ids.repeat(cfg.steps, 1), cfg, show_progress=False)
    curve = [h["loss"] for h in run["history"]]
    assert curve[-1] < 0.3 * curve[0], curve
    assert all(h["kl"] >= 0 and h["hidden"] >= 0 for h in run["history"])


def test_report(pruned_llama, tiny_dirs, tmp_path, text_file, eval_file, no_threads):
    out = tmp_path / "rec"
    report = recover(pruned_llama, out, tiny_dirs["llama"], str(text_file), steps=30, lr=3e-3,
                     eval_data=str(eval_file), eval_seqlen=64, **QUIET)
    assert len(json.loads((out / "loss_curve.json").read_text())) == 30
    assert report["tokens"] == 30 * 2 * 32 and report["peak_memory_gib"] > 0
    for side in ("before", "after"):
        assert report[side]["perplexity"] > 1 and len(report[side]["completions"]) == 4
    assert report["after"]["kl_nats_per_token"] < report["before"]["kl_nats_per_token"]
    assert (out / "loss_curve.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "one-shot" in md and "recovered" in md and "perplexity" in md
    assert json.loads((out / "report.json").read_text())["after"] == json.loads(json.dumps(report["after"]))
    assert not (tmp_path / "rec.ckpt").exists()


def test_resumed_equals_uninterrupted(pruned_llama, tiny_dirs, tmp_path, text_file, no_threads):
    kw = dict(steps=6, lr=3e-3, checkpoint_every=2, **QUIET)
    recover(pruned_llama, tmp_path / "full", tiny_dirs["llama"], str(text_file), **kw)
    recover(pruned_llama, tmp_path / "part", tiny_dirs["llama"], str(text_file), stop_after_steps=3, **kw)
    assert (tmp_path / "part.ckpt" / "state.safetensors").is_file()
    assert read_meta(tmp_path / "part")["recovery"]["finished"] is False
    recover(pruned_llama, tmp_path / "part", tiny_dirs["llama"], str(text_file), resume=True, force=True, **kw)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _weights(pruned_llama)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("grid", [dict(wbits=8), dict(wbits=4, group_size=32)], ids=["int8-rows", "int4-g32"])
def test_wbits_grid_kept(tiny_dirs, tmp_path, text_file, no_threads, grid):
    """Per-row 8-bit and per-group 4-bit grids: the recovered weights are on the recorded grid, zeros kept."""
    pruned = pruned_copy(tiny_dirs["llama"], tmp_path / "pruned", text_file, method="sparsegpt", **grid)
    bits = grid["wbits"]
    out = tmp_path / "rec"
    recover(pruned, out, tiny_dirs["llama"], str(text_file), steps=5, lr=1e-2, **QUIET)
    meta = read_meta(out)
    assert meta["recovery"]["grid"] is True
    model0, _ = models.load_model(pruned)
    model1, _ = models.load_model(out)
    moved = 0
    for name in models.prunable_names(model1):
        scale = meta["matrices"][name]["scale"]
        q1 = int_weight(models.weight_2d(model1.get_submodule(name)), scale, bits)   # raises off the grid
        q0 = int_weight(models.weight_2d(model0.get_submodule(name)), scale, bits)
        assert torch.equal(q1 == 0, q0 == 0)
        moved += int((q1 != q0).sum())
    assert moved > 0
    # the same run without the grid leaves the grid
    recover(pruned, tmp_path / "free", tiny_dirs["llama"], str(text_file), steps=5, lr=1e-2, use_grid=False, **QUIET)
    free, _ = models.load_model(tmp_path / "free")
    name = models.prunable_names(free)[0]
    with pytest.raises(Exception):
        int_weight(models.weight_2d(free.get_submodule(name)), meta["matrices"][name]["scale"], bits)


def test_distill_loss_against_reference():
    torch.manual_seed(0)

    class Out:
        def __init__(self, logits, hidden):
            self.logits, self.hidden_states = logits, hidden

    s = Out(torch.randn(2, 5, 11), [torch.randn(2, 5, 4) for _ in range(3)])
    t = Out(torch.randn(2, 5, 11), [torch.randn(2, 5, 4) for _ in range(3)])
    loss, parts = distill_loss(s, t, 0.5, 2.0)
    kl = F.kl_div(F.log_softmax(s.logits, -1).reshape(-1, 11), F.log_softmax(t.logits, -1).reshape(-1, 11),
                  log_target=True, reduction="batchmean")
    hid = sum(float(((hs - ht).norm(dim=-1) ** 2 / ht.norm(dim=-1) ** 2).mean())
              for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:])) / 2
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert parts["hidden"] == pytest.approx(hid, rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * float(kl) + 2.0 * hid, rel=1e-5)


def test_schedule():
    cfg = DistillConfig(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(pruned_llama, tiny_dirs, tmp_path, text_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["recover", str(pruned_llama), "--teacher", str(tiny_dirs["llama"]), "--data", str(text_file),
              "--steps", "4", "--grad-accum", "2", "--lr", "3e-3", "--seqlen", "32", "--threads", "1", "--max-segments", "1"]
    one = subprocess.run([sys.executable, "-m", "sparse_export.cli.main", *common, "--batch", "2",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "sparse_export.cli.main", *common, "--batch", "1",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert read_meta(tmp_path / "two")["recovery"]["processes"] == 2
    a, b, c = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(pruned_llama)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert any((a[k] - c[k]).abs().max() > 1e-3 for k in a)
