"""Streamed prune and eval of a model of any size: wall time, CPU time and peak RSS of each step (each in
its own process, measured by the kernel), and per layer: calibration forward, Hessian accumulation,
factorisation and column sweep, read and write, peak memory so far.

Calibration: C4 samples from ../shared/assets; evaluation: WikiText-2 raw test. Results:
benchmarks/results/stream-<name>.{json,md}.

  # Llama-3-8B shapes, random bf16 weights (16 GB written once under --work), 4 x 256 calibration tokens
  python benchmarks/bench_stream.py --shape llama-3-8b --work /data/bench-stream
  # seconds: a tiny custom shape, to see that it runs
  python benchmarks/bench_stream.py --shape tiny --layers 4 --work /tmp/bench-stream
  # SmolLM2-135M streamed against in memory (same perplexity, CPU time side by side)
  python benchmarks/bench_stream.py --compare-smollm2 --work /tmp/bench-stream
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sparse_export import data
from sparse_export.outputs import cpu_name, write_json
from sparse_export.report import table

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_random_model", Path(__file__).with_name("make_random_model.py"))
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)  # the sibling generator script (benchmarks/ is not a package)
SHAPES, write_model = _gen.SHAPES, _gen.write_model


def run_measured(cmd: list[str]) -> dict:
    """Run a command in its own process: wall s and CPU s (user + system, from wait4). Peak RSS comes from the
    child's own VmHWM (in its JSON): wait4's ru_maxrss carries the parent's peak across fork+exec."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed ({code}):\n{err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "sparse_export.cli.main", *map(str, args)]


def prune_and_eval(model: Path, work: Path, args, calib: Path, wiki: Path, name: str, extra=(),
                   prune_only=()) -> dict:
    out = work / f"pruned-{name}"
    shutil.rmtree(out, ignore_errors=True)
    common = ["--threads", args.threads] if args.threads else []
    print(f"{name}: pruning {model} ...", flush=True)
    prune = run_measured(cli("prune", model, "--out", out, "--sparsity", 0.5, "--calib", calib, "--nsamples",
                             args.nsamples, "--seqlen", args.seqlen, "--device", args.device, *common, *extra,
                             *prune_only))
    meta = json.loads((out / "sparse_export.json").read_text())
    prune["peak_rss_gib"] = meta["peak_memory_gib"]
    print(f"{name}: evaluating ...", flush=True)
    res_file = work / f"eval-{name}.json"
    ev = run_measured(cli("eval", out, "--data", wiki, "--seqlen", args.eval_seqlen, "--max-segments",
                          args.eval_windows, "--json", res_file, "--device", args.device, *common, *extra))
    res = json.loads(res_file.read_text())
    ev["peak_rss_gib"] = res.get("peak_memory_gib")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"name": name, "prune": prune, "eval": ev, "perplexity": res["perplexity"],
            "streamed": meta.get("streamed"), "calibration_mode": meta["calibration_mode"],
            "prune_in_process": meta["timing"], "layers": meta.get("layers", []),
            "recovery": meta.get("recovery"), "sparsity": meta["pruned_sparsity"]}


def layer_rows(layers: list[dict]) -> list[dict]:
    keys = ["layer", "step_wall_s", "step_cpu_s", "forward_s", "hessian_s", "factor_s", "sweep_s", "load_s",
            "write_s", "peak_gib"]
    return [{k: r.get(k) for k in keys} for r in layers]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--layers", type=int, help="override the shape's number of decoder layers")
    ap.add_argument("--model", type=Path, help="an existing safetensors folder instead of a generated one")
    ap.add_argument("--work", type=Path, required=True, help="where the random model and outputs go")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the pruned folders")
    ap.add_argument("--recover", choices=["blockwise"], help="prune with --recover blockwise (its time per layer "
                    "and peak RSS; results stream-<shape>-blockwise)")
    ap.add_argument("--compare-smollm2", action="store_true",
                    help="SmolLM2-135M streamed and in memory (16 x 512 calibration, 6 x 2048 evaluation)")
    args = ap.parse_args()
    calib = data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
    wiki = data.shared_asset("wikitext2-raw", "wiki.test.raw")
    if calib is None or wiki is None:
        sys.exit("benchmark skipped: ../shared/assets is absent")
    args.work.mkdir(parents=True, exist_ok=True)

    if args.compare_smollm2:
        from sparse_export.pruning.jobs import plain_copy

        args.nsamples, args.seqlen, args.eval_windows, args.eval_seqlen = 16, 512, 6, 2048
        model = plain_copy("smollm2", args.work / "smollm2-dense")
        runs = [prune_and_eval(model, args.work, args, calib, wiki, "streamed", ["--stream"]),
                prune_and_eval(model, args.work, args, calib, wiki, "in-memory", ["--no-stream"])]
        stem, title = "stream-smollm2", "SmolLM2-135M, streamed vs in memory"
    else:
        shape = dict(SHAPES[args.shape])
        if args.layers:
            shape["layers"] = args.layers
        tag = args.shape + (f"-{args.layers}l" if args.layers else "")
        model = args.model or args.work / f"random-{tag}"
        if not args.model and not (model / "config.json").exists():
            print(f"writing a random {tag} model to {model} ...", flush=True)
            shutil.rmtree(model, ignore_errors=True)
            t0 = time.perf_counter()
            write_model(shape, model, log=lambda *_: None)
            print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
        rec = ["--recover", args.recover] if args.recover else []
        tag_run = tag + (f"-{args.recover}" if args.recover else "")
        runs = [prune_and_eval(model, args.work, args, calib, wiki, tag_run, ["--stream"], rec)]
        stem = f"stream-{tag_run}" if not args.model else f"stream-{Path(args.model).name}"
        title = f"{tag} shapes, random bf16 weights" if not args.model else str(args.model)

    steps = []
    for r in runs:
        for step in ("prune", "eval"):
            steps.append({"run": r["name"], "step": step, **r[step],
                          "perplexity": r["perplexity"] if step == "eval" else None,
                          "mode": r["calibration_mode"] if step == "prune" else None})
    step_cols = [("run", "run"), ("step", "step"), ("wall s", "wall_s"), ("CPU s", "cpu_s"),
                 ("peak RSS GiB", "peak_rss_gib"), ("perplexity", "perplexity"), ("calibration", "mode")]
    layer_cols = [("layer", "layer"), ("wall s", "step_wall_s"), ("CPU s", "step_cpu_s"), ("forward s", "forward_s"),
                  ("Hessian s", "hessian_s"), ("factor s", "factor_s"), ("sweep s", "sweep_s"),
                  ("read s", "load_s"), ("write s", "write_s"), ("peak GiB", "peak_gib")]
    text = table(steps, step_cols)
    per_layer = {r["name"]: layer_rows(r["layers"]) for r in runs}
    layer_text = "\n\n".join(f"### {name}: per layer\n\n{table(rows, layer_cols)}" for name, rows in per_layer.items()
                             if rows and rows[0].get("step_wall_s") is not None)
    rec_cols = [("layer", "layer"), ("recovery wall s", "seconds"), ("recovery CPU s", "cpu_seconds"),
                ("steps", "steps"), ("error before", "before"), ("error after", "after"), ("kept", "kept")]
    for r in runs:
        if r.get("recovery"):
            layer_text += (f"\n\n### {r['name']}: block-wise recovery per layer (its share of the layer's time above; "
                           f"CPU s includes the dense layer's target outputs)\n\n"
                           + table(r["recovery"]["layers"], rec_cols))
    print(text)
    print(layer_text)
    result = {"title": title, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
              "eval_seqlen": args.eval_seqlen, "device": args.device, "threads": args.threads, "runs": runs,
              "cpu": cpu_name(), "calibration": calib.name, "evaluation": wiki.name}
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    write_json(res_dir / f"{stem}.json", result)
    (res_dir / f"{stem}.md").write_text(
        f"# Streamed prune and eval: {title}\n\n{args.nsamples} x {args.seqlen} C4 calibration tokens, "
        f"SparseGPT 50%{' + --recover ' + args.recover if getattr(args, 'recover', None) else ''}; WikiText-2 {args.eval_windows} x {args.eval_seqlen} evaluation tokens; device "
        f"{args.device}; {cpu_name()}. Each step in its own process (wall; CPU = user + system from wait4; peak RSS = the "
        f"process's VmHWM).\n\n{text}\n\n{layer_text}\n")
    print(f"wrote {res_dir / stem}.md")


if __name__ == "__main__":
    main()
