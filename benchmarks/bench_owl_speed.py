"""Does non-uniform sparsity cost speed? DeepSparse prefill and decode of the most accurate 70% model
(ALPS + OWL: per-layer sparsities 59-75%) next to uniform 70% SparseGPT and the dense model (issue 17).

SmolLM2-135M, the pruning benchmark's quick protocol (16 x 512 C4 calibration tokens). Prefill: 1 x 400
tokens, last-token logits, models timed interleaved. Decode: KV-cache graphs, 128 new tokens after a
256-token prompt, one thread (DeepSparse 1.8 crashes on KV-cache graphs of small grouped-query models with
more threads). Results: benchmarks/results/owl-speed.{json,md}.

  python benchmarks/bench_owl_speed.py --work /tmp/owl-speed     # ~25 min; folders are reused on a rerun
  python benchmarks/bench_owl_speed.py --work /tmp/owl-speed --prepare-only   # the untimed part first
"""

import argparse
import sys
from pathlib import Path

from sparse_export import data
from sparse_export.export.onnx_kv import export_kv_onnx
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.measure.generation import benchmark_generation, generation_table
from sparse_export.measure.prefill import benchmark_prefill, prefill_table
from sparse_export.outputs import cpu_name, read_meta, write_json
from sparse_export.pruning import jobs
from sparse_export.pruning.recipe import Recipe

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # label -> recipe fields (None: the dense model)
    "dense": None,
    "sparsegpt 70%": dict(sparsity=0.7),
    "alps+owl 70%": dict(sparsity=0.7, method="alps", allocation="owl"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="pruned models and deployments (kept, reused)")
    ap.add_argument("--threads", type=int, default=None, help="prefill threads (default: all)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--prepare-only", action="store_true", help="prune and export, time nothing (may share the CPU)")
    args = ap.parse_args()
    calib = data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
    if calib is None:
        sys.exit("benchmark skipped: ../shared/assets is absent")
    args.work.mkdir(parents=True, exist_ok=True)

    dense = jobs.plain_copy("smollm2", args.work / "dense")
    folders, layer_sparsity = {}, {}
    for label, fields in MODELS.items():
        name = label.replace(" ", "-").replace("%", "").replace("+", "-")
        model = dense
        if fields:
            model = args.work / name
            if not model.exists():
                print(f"pruning {label} ...", flush=True)
                jobs.prune(dense, model, Recipe(calib=str(calib), nsamples=16, seqlen=512, **fields), log=print)
            per_layer = [x["sparsity"] for x in (read_meta(model).get("allocation") or {}).get("layers", [])]
            layer_sparsity[label] = [min(per_layer), max(per_layer)] if per_layer else None
        plain, kv = args.work / f"onnx-{name}", args.work / f"kv-{name}"
        if not plain.exists():
            export_onnx(model, plain, log=print)
        if not kv.exists():
            export_kv_onnx(model, kv, log=print)
        folders[label] = (plain, kv)
    if args.prepare_only:
        return

    prefill = benchmark_prefill({k: v[0] for k, v in folders.items()}, ["deepsparse"], baseline="dense",
                                iterations=args.iterations, threads=args.threads)
    decode = benchmark_generation({k: v[1] for k, v in folders.items()}, ["deepsparse"], baseline="dense",
                                  threads=1, iterations=3)
    result = {"cpu": cpu_name(), "layer_sparsity": layer_sparsity, "prefill": prefill, "decode": decode}
    write_json(RESULTS / "owl-speed.json", result)
    spread = "; ".join(f"{k}: per-layer sparsity {v[0]:.3f}-{v[1]:.3f}" for k, v in layer_sparsity.items() if v)
    (RESULTS / "owl-speed.md").write_text(
        "# Non-uniform (OWL) sparsity on DeepSparse: SmolLM2-135M at 70%\n\n"
        f"{cpu_name()}. {spread}. Command: `python benchmarks/bench_owl_speed.py --work DIR`.\n\n"
        f"## Prefill: 1 x 400 tokens, last-token logits, threads {args.threads or 'all'}\n\n"
        f"{prefill_table(prefill)}\n\n## Decode: 128 new tokens after 256, 1 thread\n\n{generation_table(decode)}\n")
    print((RESULTS / "owl-speed.md").read_text())


if __name__ == "__main__":
    main()
