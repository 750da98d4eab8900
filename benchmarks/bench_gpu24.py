"""2:4 on GPU: fp16 matmul latency dense vs 2:4, per layer and end to end.

Per layer: the OPT-175B linear shapes with 2048 tokens (SparseGPT paper, A100 + CUTLASS: QKV/out
1.79x, FC1 1.67x, FC2 1.54x). End to end: prefill of an OPT-1.3B-shaped model (random weights,
magnitude 2:4 on every decoder Linear) at 1x2048 and 16x512 tokens, with the same weights dense as
the baseline. Every kernel backend torch offers here (cuSPARSELt, CUTLASS) is measured.
Results: benchmarks/results/gpu24.{json,md}. Without a CUDA GPU it says it skipped (and writes that).

  python benchmarks/bench_gpu24.py            # a few minutes on one H100
  python benchmarks/bench_gpu24.py --quick    # fewer iterations
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_export.outputs import library_versions, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOKENS = 2048
LAYERS = [  # name, in features, out features, the paper's 2:4 speedup (A100, CUTLASS)
    ("QKV/out 12288x12288", 12288, 12288, 1.79),
    ("FC1 12288->49152", 12288, 49152, 1.67),
    ("FC2 49152->12288", 49152, 12288, 1.54),
]
SHAPES = [(1, 2048), (16, 512)]  # batch x seqlen for the end-to-end prefill
E2E_BAR = 1.2
OPT_1B3 = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
               word_embed_proj_dim=2048, max_position_embeddings=2048, vocab_size=50272)


def cuda_ms(fn, warmup, iterations):
    """Median milliseconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(torch.tensor(times).median())


def backends():
    from sparse_export.runtimes.torch_sparse24 import pick_backend

    return (["cusparselt"] if pick_backend("auto") == "cusparselt" else []) + ["cutlass"]


def prune_24(w):
    """Magnitude 2:4 (keep the 2 largest of every 4 along the input dim), the project's pruner."""
    from sparse_export.sparsegpt import magnitude

    return magnitude(w, n=2, m=4)[0].to(w.dtype)


@torch.inference_mode()
def bench_layers(warmup, iterations):
    from sparse_export.runtimes.torch_sparse24 import to_semi_structured

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, fin, fout, paper in LAYERS:
        w = prune_24(torch.randn(fout, fin, device="cuda", dtype=torch.float16, generator=g))
        x = torch.randn(TOKENS, fin, device="cuda", dtype=torch.float16, generator=g)
        dense_ms = cuda_ms(lambda: torch.nn.functional.linear(x, w), warmup, iterations)
        ref = torch.nn.functional.linear(x, w).float()
        for backend in backends():
            ws = to_semi_structured(w, backend)
            sparse_ms = cuda_ms(lambda: torch.nn.functional.linear(x, ws), warmup, iterations)
            err = float((torch.nn.functional.linear(x, ws).float() - ref).abs().max() / ref.abs().max())
            rows.append({"layer": name, "in": fin, "out": fout, "tokens": TOKENS, "backend": backend,
                         "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                         "paper_speedup": paper, "meets_paper": dense_ms / sparse_ms >= paper,
                         "max_rel_error": err})
            del ws
    return rows


def opt_1b3():
    """OPT-1.3B shape with random fp16 weights on the GPU, every decoder Linear magnitude-2:4."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_export import models

    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", **OPT_1B3)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():
        for name in models.prunable_names(model):
            lin = model.get_submodule(name)
            lin.weight.copy_(prune_24(lin.weight))
    return model


@torch.inference_mode()
def bench_e2e(warmup, iterations):
    import copy

    from sparse_export.onnx_export import ExportModule
    from sparse_export.runtimes.torch_sparse24 import sparsify_24

    dense = opt_1b3()
    params = sum(p.numel() for p in dense.parameters())
    variants = [("dense (cuBLAS)", dense, None)]
    for backend in backends():
        model = copy.deepcopy(dense)
        swapped, skipped = sparsify_24(model, backend)
        variants.append((backend, model, (len(swapped), len(skipped))))
    rows = []
    for batch, seqlen in SHAPES:
        ids = torch.randint(0, OPT_1B3["vocab_size"], (batch, seqlen), device="cuda")
        mask = torch.ones_like(ids)
        base = None
        for label, model, swaps in variants:
            run = ExportModule(model, "last")
            ms = cuda_ms(lambda: run(ids, mask), warmup, iterations)
            base = base or ms
            rows.append({"model": f"OPT-1.3B shape, {params / 1e9:.2f}B params", "batch": batch,
                         "seqlen": seqlen, "kernels": label, "median_ms": ms, "speedup": base / ms,
                         "tokens_per_s": batch * seqlen / ms * 1e3,
                         "linears_swapped": swaps[0] if swaps else 0, "linears_skipped": swaps[1] if swaps else 0})
    return rows


def markdown(r):
    lines = ["# 2:4 on GPU: dense vs 2:4 fp16 latency", ""]
    if "skipped" in r:
        return "\n".join(lines + [f"Skipped: {r['skipped']} ({r['created']}).", ""])
    e = r["environment"]
    lines += [f"{e['gpu']}, torch {e['torch']}, CUDA {e['cuda']}, cuSPARSELt {e['cusparselt']}. {r['created']}", "",
              f"## Per layer, {TOKENS} tokens (OPT-175B shapes)", "",
              "| layer | backend | dense ms | 2:4 ms | speedup | paper (A100, CUTLASS) | max rel. error |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['layer']} | {x['backend']} | {x['dense_ms']:.3f} | {x['sparse_ms']:.3f} | "
              f"{x['speedup']:.2f}x | {x['paper_speedup']:.2f}x | {x['max_rel_error']:.1e} |" for x in r["layers"]]
    lines += ["", "## End-to-end prefill (logits of the last position)", "",
              "| model | batch x seqlen | kernels | median ms | tokens/s | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['model']} | {x['batch']} x {x['seqlen']} | {x['kernels']} | {x['median_ms']:.2f} | "
              f"{x['tokens_per_s']:.0f} | {x['speedup']:.2f}x |" for x in r["e2e"]]
    b = r["bar"]
    lines += ["", f"Bar: per-layer speedups at least the paper's: {'met' if b['layers'] else 'NOT met'} "
              f"(best backend per layer); end-to-end prefill above {E2E_BAR}x at every shape: "
              f"{'met' if b['e2e'] else 'NOT met'}.", ""]
    return "\n".join(lines)


def bar(layers, e2e):
    best = {}
    for x in layers:
        best[x["layer"]] = max(best.get(x["layer"], 0), x["speedup"] / x["paper_speedup"])
    e2e_best = {}
    for x in e2e:
        if x["kernels"] != "dense (cuBLAS)":
            key = (x["batch"], x["seqlen"])
            e2e_best[key] = max(e2e_best.get(key, 0), x["speedup"])
    return {"layers": all(v >= 1 for v in best.values()), "e2e": all(v > E2E_BAR for v in e2e_best.values())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed iterations")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu24", help="result path without suffix")
    args = ap.parse_args()
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_json, out_md = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("benchmark skipped: no CUDA GPU on this machine")
        if out_json.exists() and "skipped" not in json.loads(out_json.read_text()):
            print(f"kept the GPU results already in {out_json}")
            return
        result = {"skipped": "no CUDA GPU on this machine", "created": created, "versions": library_versions()}
        write_json(out_json, result)
        out_md.write_text(markdown(result))
        print(f"wrote {out_json} and {out_md}")
        return
    warm, iters = (3, 10) if args.quick else (10, 50)
    layers = bench_layers(warm, iters)
    e2e = bench_e2e(3, 5 if args.quick else 20)
    result = {
        "environment": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "cusparselt": torch.backends.cusparselt.version(),
                        "backends": backends()},
        "layers": layers, "e2e": e2e, "bar": bar(layers, e2e),
        "created": created, "versions": library_versions(),
    }
    write_json(out_json, result)
    out_md.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main()
