"""2:4 on GPU: fp16 matmul latency dense vs 2:4, per layer and end to end.

Per layer (2048 tokens): the OPT-175B linear shapes (SparseGPT paper, A100 + CUTLASS: QKV/out
1.79x, FC1 1.67x, FC2 1.54x), plus the Llama-3-8B and SmolLM2-135M shapes for scale. End to end:
prefill of an OPT-1.3B-shaped and a SmolLM2-135M-shaped model (random fp16 weights, magnitude 2:4 on
every decoder Linear) at 1x2048 and 16x512 tokens, with the same weights dense as the baseline. Random
weights are fine for speed: the kernels' time does not depend on the values (the accuracy of pruning is
measured on CPU, benchmarks/bench_prune.py). Every kernel backend torch offers (cuSPARSELt, CUTLASS) is
probed with a tiny 2:4 matmul; those that do not run on this GPU are recorded with the reason (PyTorch's
CUTLASS 2:4 kernels run on compute capability 8.x only). Each 2:4 result is checked against the dense one.
Both parts are timed twice: eagerly (what the torch-sparse24 runtime does; torch <= 2.11 sets up and
tears down a cuSPARSELt plan in every call: 0.45-1 ms of CPU work per call on an H200 host) and captured in CUDA graphs, dense
and 2:4 alike (the kernels' own time).
Results: benchmarks/results/gpu24.{json,md}. Without a CUDA GPU it says it skipped (and writes that).
scripts/device_gpu24.sh runs it, with the CUDA tests, on a machine that has no registry access.

  python benchmarks/bench_gpu24.py            # about 80 s on one H200
  python benchmarks/bench_gpu24.py --quick    # fewer iterations
"""

import argparse
import copy
import gc
import json
import math
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from sparse_export.outputs import library_versions, write_json

RESULTS = ROOT / "benchmarks" / "results"
TOKENS = 2048
DENSE = "dense (cuBLAS)"
LAYERS = [  # group, name, in features, out features, the paper's 2:4 speedup (A100, CUTLASS) or None
    ("OPT-175B", "QKV/out 12288->12288", 12288, 12288, 1.79),
    ("OPT-175B", "FC1 12288->49152", 12288, 49152, 1.67),
    ("OPT-175B", "FC2 49152->12288", 49152, 12288, 1.54),
    ("Llama-3-8B", "q/o 4096->4096", 4096, 4096, None),
    ("Llama-3-8B", "k/v 4096->1024", 4096, 1024, None),
    ("Llama-3-8B", "gate/up 4096->14336", 4096, 14336, None),
    ("Llama-3-8B", "down 14336->4096", 14336, 4096, None),
    ("SmolLM2-135M", "q/o 576->576", 576, 576, None),
    ("SmolLM2-135M", "k/v 576->192", 576, 192, None),
    ("SmolLM2-135M", "gate/up 576->1536", 576, 1536, None),
    ("SmolLM2-135M", "down 1536->576", 1536, 576, None),
]
SHAPES = [(1, 2048), (16, 512)]  # batch x seqlen for the end-to-end prefill
E2E_BAR = 1.2
OPT_1B3 = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
               word_embed_proj_dim=2048, max_position_embeddings=2048, vocab_size=50272)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, vocab_size=49152,
                    tie_word_embeddings=True)
E2E_MODELS = [  # label, model type, config, counts for the bar
    ("OPT-1.3B shape", "opt", OPT_1B3, True),
    ("SmolLM2-135M shape", "llama", SMOLLM2_135M, False),
]


def cuda_ms(fn, warmup, iterations, inner=1):
    """Median milliseconds of one fn(), timed with CUDA events around `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return float(torch.tensor(times).median())


def probe_backends():
    """{backend: None if its 2:4 kernels run on this GPU, else why not}."""
    from sparse_export.runtimes.torch_sparse24 import BACKENDS, backend_error

    return {b: backend_error(b) for b in BACKENDS[1:]}


def usable(errors):
    return [b for b, e in errors.items() if e is None]


def prune_24(w):
    """Magnitude 2:4 (keep the 2 largest of every 4 along the input dim), the project's pruner."""
    from sparse_export.pruning.pruners import magnitude

    return magnitude(w, n=2, m=4)[0].to(w.dtype)


def rel_error(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max())


def first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@torch.inference_mode()
def bench_layers(backends, warmup, iterations, log=print):
    from sparse_export.runtimes.torch_sparse24 import to_semi_structured

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for group, name, fin, fout, paper in LAYERS:
        w = prune_24(torch.randn(fout, fin, device="cuda", dtype=torch.float16, generator=g))
        x = torch.randn(TOKENS, fin, device="cuda", dtype=torch.float16, generator=g)
        one = cuda_ms(lambda: torch.nn.functional.linear(x, w), 2, 3)
        inner = max(10, min(100, math.ceil(1.0 / max(one, 1e-3))))  # >= 10 calls and ~1 ms between events
        dense_ms = cuda_ms(lambda: torch.nn.functional.linear(x, w), warmup, iterations, inner)
        ref = torch.nn.functional.linear(x, w)
        flops = 2 * TOKENS * fin * fout
        for backend in backends:
            row = {"group": group, "layer": name, "in": fin, "out": fout, "tokens": TOKENS, "backend": backend,
                   "dense_ms": dense_ms, "dense_tflops": flops / dense_ms / 1e9, "calls_per_timing": inner,
                   "paper_speedup": paper}
            try:
                ws = to_semi_structured(w, backend)
                sparse_ms = cuda_ms(lambda: torch.nn.functional.linear(x, ws), warmup, iterations, inner)
                row.update(sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                           max_rel_error=rel_error(torch.nn.functional.linear(x, ws), ref),
                           meets_paper=None if paper is None else dense_ms / sparse_ms >= paper)
                if backend == "cusparselt":  # the default algorithm (0) against cuSPARSELt's own pick
                    row.update(searched(ws, w, x, ref, dense_ms, warmup, iterations, inner))
                ws = None
            except Exception as e:  # record and go on: one failing kernel must not lose the rest
                row["error"] = first_line(e)
            rows.append(row)
            log(f"{group} {name} {backend}: dense {dense_ms:.4f} ms, "
                + (f"2:4 {row['sparse_ms']:.4f} ms ({row['speedup']:.2f}x, err {row['max_rel_error']:.1e}) "
                   f"{searched_cell(row)}" if "error" not in row else f"failed: {row['error']}"))
        w = x = ref = None  # free before the next shape
        torch.cuda.empty_cache()
    return rows


def searched(ws, w, x, ref, dense_ms, warmup, iterations, inner):
    """cuSPARSELt's best algorithm for this matmul (its own search), timed through torch._cslt_sparse_mm."""
    try:
        xt = x.t()
        alg = int(torch._cslt_sparse_mm_search(ws.packed, xt))
        if alg == 0:
            return {"searched_alg_id": 0}
        ms = cuda_ms(lambda: torch._cslt_sparse_mm(ws.packed, xt, alg_id=alg), warmup, iterations, inner)
        return {"searched_alg_id": alg, "searched_sparse_ms": ms, "searched_speedup": dense_ms / ms,
                "searched_max_rel_error": rel_error(torch._cslt_sparse_mm(ws.packed, xt, alg_id=alg).t(), ref)}
    except Exception as e:
        return {"searched_error": first_line(e)}


def graph_ms(fn, warmup, iterations, inner):
    """Like cuda_ms, but fn captured once in a CUDA graph and replayed: no per-call CPU work is timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    ms = cuda_ms(graph.replay, warmup, iterations, inner)
    graph.replay()
    torch.cuda.synchronize()
    return ms, out


@torch.inference_mode()
def bench_layers_graphs(backends, warmup, iterations, log=print):
    """The per-layer matmuls captured in CUDA graphs, dense and 2:4: the kernels' own time."""
    from sparse_export.runtimes.torch_sparse24 import to_semi_structured

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for group, name, fin, fout, paper in LAYERS:
        w = prune_24(torch.randn(fout, fin, device="cuda", dtype=torch.float16, generator=g))
        x = torch.randn(TOKENS, fin, device="cuda", dtype=torch.float16, generator=g)
        ref = torch.nn.functional.linear(x, w)
        inner = 20
        row = {"group": group, "layer": name, "in": fin, "out": fout, "tokens": TOKENS, "paper_speedup": paper}
        try:
            dense_ms, _ = graph_ms(lambda: torch.nn.functional.linear(x, w), warmup, iterations, inner)
            row.update(dense_ms=dense_ms, dense_tflops=2 * TOKENS * fin * fout / dense_ms / 1e9)
        except Exception as e:
            row["error"] = "dense: " + first_line(e)
        for backend in backends:
            r = dict(row, backend=backend)
            if "error" not in r:
                try:
                    ws = to_semi_structured(w, backend)
                    sparse_ms, out = graph_ms(lambda: torch.nn.functional.linear(x, ws), warmup, iterations, inner)
                    r.update(sparse_ms=sparse_ms, speedup=r["dense_ms"] / sparse_ms,
                             max_rel_error=rel_error(out, ref))
                except Exception as e:
                    r["error"] = first_line(e)
                ws = None
            rows.append(r)
            log(f"graph {group} {name} {backend}: "
                + (f"dense {r['dense_ms']:.4f} ms, 2:4 {r['sparse_ms']:.4f} ms ({r['speedup']:.2f}x)"
                   if "error" not in r else f"failed: {r['error']}"))
        w = x = ref = None
        torch.cuda.empty_cache()
    return rows


def build_model(model_type, config_kw):
    """A model of that shape with random fp16 weights on the GPU, every decoder Linear magnitude-2:4."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_export import models

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **config_kw)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():
        for name in models.prunable_names(model):
            lin = model.get_submodule(name)
            lin.weight.copy_(prune_24(lin.weight))
    return model


def eager_ms(model, ids, mask, warmup, iterations):
    """Prefill through the export wrapper (what the torch-sparse24 runtime runs), eager."""
    from sparse_export.export.graph import ExportModule

    run = ExportModule(model, "last")
    out = run(ids, mask)
    return cuda_ms(lambda: run(ids, mask), warmup, iterations), out


def captured_ms(model, ids, mask, warmup, iterations):
    """Prefill captured in a CUDA graph (no attention mask: all tokens real)."""
    ms, out = graph_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits,
                       warmup, iterations, 1)
    return ms, out.clone()  # the graph's output buffer is overwritten by the next replay


def bench_e2e(backends, warmup, iterations, graphs=False, log=print):
    """End-to-end prefill, dense vs 2:4, eager or (graphs=True) captured in CUDA graphs."""
    from sparse_export.runtimes.torch_sparse24 import sparsify_24

    timer = captured_ms if graphs else eager_ms
    rows = []
    for label, model_type, config_kw, counts in E2E_MODELS:
        dense = build_model(model_type, config_kw)
        params = sum(p.numel() for p in dense.parameters())
        variants = [(DENSE, dense, (0, 0))]
        for backend in backends:
            model = copy.deepcopy(dense)
            swapped, skipped = sparsify_24(model, backend)
            variants.append((backend, model, (len(swapped), len(skipped))))
        for batch, seqlen in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(batch * seqlen)
            ids = torch.randint(0, config_kw["vocab_size"], (batch, seqlen), device="cuda", generator=gen)
            mask = torch.ones_like(ids)
            base, ref = None, None
            for kernels, model, (n_swapped, n_skipped) in variants:
                row = {"model": f"{label}, {params / 1e9:.3f}B params", "model_type": model_type,
                       "counts_for_bar": counts, "batch": batch, "seqlen": seqlen, "kernels": kernels}
                if not graphs:
                    row.update(linears_swapped=n_swapped, linears_skipped=n_skipped)
                try:
                    with torch.inference_mode():
                        ms, out = timer(model, ids, mask, warmup, iterations)
                    if kernels == DENSE:
                        base, ref = ms, out
                    row.update(median_ms=ms, tokens_per_s=batch * seqlen / ms * 1e3,
                               speedup=base / ms if base else None,
                               logits_max_rel_error=rel_error(out, ref) if ref is not None else None)
                except Exception as e:
                    row["error"] = first_line(e)
                rows.append(row)
                log(f"{'graph ' if graphs else ''}{label} {batch}x{seqlen} {kernels}: "
                    + (f"{row['median_ms']:.2f} ms, {row['speedup']:.2f}x" if "error" not in row
                       else f"failed: {row['error']}"))
        variants.clear()
        dense = model = None
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def searched_cell(x):
    if "searched_error" in x:
        return f"search failed: {x['searched_error']}"
    if "searched_sparse_ms" in x:
        return f"alg {x['searched_alg_id']}: {x['searched_sparse_ms']:.4f} ms ({x['searched_speedup']:.2f}x)"
    return "alg 0 (the default)" if "searched_alg_id" in x else "-"


def fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown(r):
    lines = ["# 2:4 on GPU: dense vs 2:4 fp16 latency", ""]
    if "skipped" in r:
        return "\n".join(lines + [f"Skipped: {r['skipped']} ({r['created']}).", ""])
    e = r["environment"]
    lines += [f"{e['gpu']} (compute capability {e['capability']}), torch {e['torch']}, CUDA {e['cuda']}, "
              f"cuSPARSELt {e['cusparselt']}, fp16. {r['created']}", ""]
    for b, why in e["backend_errors"].items():
        lines.append(f"- {b}: " + ("runs here" if why is None else f"does not run here ({why})"))
    for section in ("layers", "e2e", "layers_graph", "e2e_graph"):
        if section in r.get("errors", {}):
            lines.append(f"- the {section} section failed: {r['errors'][section]}")
    lines += ["", f"## Per layer, {TOKENS} tokens, y = x W^T", "",
              "Median of CUDA-event timings; small layers are timed over several back-to-back calls. The 2:4 "
              "column uses torch's default cuSPARSELt algorithm (alg_id 0), as `to_sparse_semi_structured` "
              "and the torch-sparse24 runtime do; the last column is cuSPARSELt's own search.", "",
              "| shapes | layer | backend | dense ms | dense TFLOP/s | 2:4 ms | speedup | paper (A100, CUTLASS) "
              "| max rel. error | cuSPARSELt's searched algorithm |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r.get("layers", []):
        if "error" in x:
            lines.append(f"| {x['group']} | {x['layer']} | {x['backend']} | {x['dense_ms']:.4f} | "
                         f"{x['dense_tflops']:.0f} | failed: {x['error']} | | | | |")
            continue
        lines.append(f"| {x['group']} | {x['layer']} | {x['backend']} | {x['dense_ms']:.4f} | "
                     f"{x['dense_tflops']:.0f} | {x['sparse_ms']:.4f} | {x['speedup']:.2f}x | "
                     f"{fmt(x['paper_speedup'], '.2f', 'x')} | {x['max_rel_error']:.1e} | {searched_cell(x)} |")
    lines += ["", "## End-to-end prefill (logits of the last position)", "",
              "Random fp16 weights, magnitude 2:4 on every decoder Linear; the dense baseline has the same "
              "(pruned) weights. Eager PyTorch, median of CUDA-event timings.", "",
              "| model | batch x seqlen | kernels | Linears on 2:4 | median ms | tokens/s | speedup "
              "| logits max rel. error |", "|---|---|---|---|---|---|---|---|"]
    for x in r.get("e2e", []):
        swaps = "-" if x["kernels"] == DENSE else f"{x['linears_swapped']} (+{x['linears_skipped']} dense)"
        if "error" in x:
            lines.append(f"| {x['model']} | {x['batch']} x {x['seqlen']} | {x['kernels']} | {swaps} | "
                         f"failed: {x['error']} | | | |")
            continue
        lines.append(f"| {x['model']} | {x['batch']} x {x['seqlen']} | {x['kernels']} | {swaps} | "
                     f"{x['median_ms']:.2f} | {x['tokens_per_s']:.0f} | {fmt(x['speedup'], '.2f', 'x')} | "
                     f"{fmt(x['logits_max_rel_error'], '.1e')} |")
    if r.get("layers_graph"):
        lines += ["", f"## Per layer in CUDA graphs, {TOKENS} tokens: the kernels alone", "",
                  "Each matmul captured once in a CUDA graph and replayed (20 replays between the events), "
                  "dense and 2:4 alike, so the per-call CPU work of the eager path above (cuSPARSELt plan "
                  "set-up and teardown in torch's `_cslt_sparse_mm`) is not timed.", "",
                  "| shapes | layer | backend | dense ms | dense TFLOP/s | 2:4 ms | speedup | paper (A100, CUTLASS) "
                  "| max rel. error |", "|---|---|---|---|---|---|---|---|---|"]
        for x in r["layers_graph"]:
            if "error" in x:
                lines.append(f"| {x['group']} | {x['layer']} | {x['backend']} | failed: {x['error']} | | | | | |")
                continue
            lines.append(f"| {x['group']} | {x['layer']} | {x['backend']} | {x['dense_ms']:.4f} | "
                         f"{x['dense_tflops']:.0f} | {x['sparse_ms']:.4f} | {x['speedup']:.2f}x | "
                         f"{fmt(x['paper_speedup'], '.2f', 'x')} | {x['max_rel_error']:.1e} |")
    if r.get("e2e_graph"):
        lines += ["", "## End-to-end prefill in CUDA graphs", "",
                  "The same models, each forward (no attention mask) captured in a CUDA graph and replayed.", "",
                  "| model | batch x seqlen | kernels | median ms | tokens/s | speedup | logits max rel. error |",
                  "|---|---|---|---|---|---|---|"]
        for x in r["e2e_graph"]:
            if "error" in x:
                lines.append(f"| {x['model']} | {x['batch']} x {x['seqlen']} | {x['kernels']} | "
                             f"failed: {x['error']} | | | |")
                continue
            lines.append(f"| {x['model']} | {x['batch']} x {x['seqlen']} | {x['kernels']} | {x['median_ms']:.2f} | "
                         f"{x['tokens_per_s']:.0f} | {fmt(x['speedup'], '.2f', 'x')} | "
                         f"{fmt(x['logits_max_rel_error'], '.1e')} |")
    b = r["bar"]
    word = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", f"Bar: OPT-175B per-layer speedups at least the paper's (best backend per layer): "
              f"{word[b['layers']]}; OPT-1.3B-shape end-to-end prefill above {E2E_BAR}x at every shape: "
              f"{word[b['e2e']]}."]
    if "bar_graph" in r:
        g = r["bar_graph"]
        lines.append(f"In CUDA graphs (kernels alone): per layer {word[g['layers']]}; end to end {word[g['e2e']]}.")
    lines.append("")
    return "\n".join(lines)


def bar(layers, e2e):
    best = {}
    for x in layers:
        if x["paper_speedup"] is not None and "error" not in x:
            best[x["layer"]] = max(best.get(x["layer"], 0), x["speedup"] / x["paper_speedup"])
    e2e_best = {}
    for x in e2e:
        if x["counts_for_bar"] and x["kernels"] != DENSE and "error" not in x:
            key = (x["batch"], x["seqlen"])
            e2e_best[key] = max(e2e_best.get(key, 0), x["speedup"])
    return {"layers": all(v >= 1 for v in best.values()) if best else None,
            "e2e": all(v > E2E_BAR for v in e2e_best.values()) if e2e_best else None}


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
    errors = probe_backends()
    backends = usable(errors)
    print(f"2:4 backends: {errors}")
    major, minor = torch.cuda.get_device_capability()
    result = {
        "environment": {"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}",
                        "torch": torch.__version__, "cuda": torch.version.cuda,
                        "cusparselt": torch.backends.cusparselt.version(), "dtype": "float16",
                        "backends": backends, "backend_errors": errors},
        "layers": [], "e2e": [], "layers_graph": [], "e2e_graph": [], "errors": {}, "created": created, "versions": library_versions(),
    }
    warm, iters = (3, 10) if args.quick else (10, 50)
    sections = [("layers", lambda: bench_layers(backends, warm, iters)),
                ("e2e", lambda: bench_e2e(backends, 3, 5 if args.quick else 20)),
                # last: a capture that fails could leave the CUDA context unusable
                ("layers_graph", lambda: bench_layers_graphs(backends, warm, iters)),
                ("e2e_graph", lambda: bench_e2e(backends, 3, 5 if args.quick else 20, graphs=True))]
    for key, fn in sections:
        try:
            result[key] = fn()
        except Exception as e:  # keep what the other section measured
            traceback.print_exc()
            result["errors"][key] = first_line(e)
        result["bar"] = bar(result["layers"], result["e2e"])
        result["bar_graph"] = bar(result["layers_graph"], result["e2e_graph"])
        write_json(out_json, result)  # after each section: a later crash keeps the earlier numbers
        out_md.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main()
