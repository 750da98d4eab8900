"""`prune-and-export --target gpu`: prune 2:4 (SparseGPT by default), optionally recover (`--recover
blockwise` inside the prune, `--recover distill` after it, the 2:4 mask fixed), export compressed-tensors,
verify, benchmark.

The output folder holds `model/` (the compressed-tensors checkpoint), report.md and report.json.
"""

import shutil

from .. import data
from ..errors import UserError
from ..evaluate import evaluate
from ..export import compressed
from ..outputs import atomic_dir, library_versions
from ..pruning.jobs import prune
from ..pruning.pruners import PRUNERS
from ..report import table, write_report
from .options import GpuOptions
from .recovery_step import distill

MODEL_SUBDIR = "model"


def run_gpu_target(model: str, out, opts: GpuOptions, log=print) -> dict:
    """prune -> export compressed -> verify -> measure -> report. Returns the dict in out/report.json."""
    opts.validate()
    recipe = opts.recipe
    data.check_source(recipe.calib, allow_self=True)
    if opts.eval_data is not None:
        data.check_source(opts.eval_data)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)

    def step_log(msg):  # the steps write into the temporary folder: leave out their "wrote" lines
        if not str(msg).startswith("wrote "):
            log(msg)

    with atomic_dir(out, opts.force) as tmp:
        pruned, folder = tmp / ".pruned", tmp / MODEL_SUBDIR
        prune_meta = prune(model, pruned, recipe, threads=opts.threads, log=step_log,
                           after_layer=opts.recovery_hook())
        oneshot, recovery = None, {"method": opts.recover} if opts.recover else None
        if opts.recover == "distill":     # the one-shot model stays beside it until verify has measured both
            oneshot = tmp / ".oneshot"
            pruned.rename(oneshot)
            recovery.update(distill(model, oneshot, pruned, opts, tmp / ".recover-ckpt", step_log))
        export_meta = compressed.export_compressed(pruned, folder, fmt="sparse-24-bitmask", log=step_log)
        report = {
            "target": "gpu", "model": str(model), "output": MODEL_SUBDIR,
            "recipe": recipe.to_dict(),
            "prune": {"sparsity": prune_meta["pruned_sparsity"], "matrices": len(prune_meta["matrices"]),
                      "calibration_mode": prune_meta["calibration_mode"], "timing": prune_meta["timing"]},
            "export": {k: export_meta[k] for k in ("format", "global_sparsity", "compressed_modules",
                                                   "weight_bytes", "dense_weight_bytes", "size_ratio")},
            "verify": verify(model, pruned, folder, opts.eval_data, opts.eval_seqlen, opts.max_segments, log,
                             oneshot=oneshot),
            "benchmark": measure_speed(folder, opts, log),
            "versions": library_versions(),
            **({"recovery": recovery} if recovery else {}),
        }
        for scratch in (pruned, oneshot, tmp / ".recover-ckpt"):
            if scratch is not None and scratch.exists():
                shutil.rmtree(scratch)
        write_report(tmp, f"{model}: {recipe.pattern} {recipe.pruner.title} for GPU serving", gpu_sections(report), report)
    log(f"wrote {out} (model/, report.md, report.json)")
    return report


def verify(model, pruned, folder, eval_data, eval_seqlen: int, max_segments, log, oneshot=None) -> dict:
    """Round trip (bit-identical), 2:4 counted in the written files, perplexity before/after (and of the
    one-shot model, when `pruned` is its recovered form)."""
    ours = compressed.round_trip_mismatches(pruned, folder)
    try:
        ref = compressed.round_trip_mismatches(pruned, folder, reference=True)
    except ImportError:
        ref = None
    if ours or ref:
        raise UserError(f"round trip is not bit-identical: {(ours or ref)[:3]}")
    counts = compressed.count_24(folder)
    violations = sum(c["violations"] for c in counts.values())
    if violations:
        raise UserError(f"{violations} groups of 4 in the written weights have more than 2 nonzeros")
    out = {"round_trip": {"sparse_export": "bit-identical",
                          "compressed_tensors": "bit-identical" if ref is not None else "skipped: not installed"},
           "pattern": {"matrices": len(counts), "groups": sum(c["groups"] for c in counts.values()),
                       "violations": 0},
           "perplexity": None}
    log(f"verified: round trip bit-identical ({'with' if ref is not None else 'without'} compressed-tensors), "
        f"2:4 holds in all {out['pattern']['groups']} groups of {len(counts)} matrices")
    if eval_data is not None:
        dense = evaluate(model, eval_data, eval_seqlen, max_segments)
        sparse = evaluate(folder, eval_data, eval_seqlen, max_segments)
        out["perplexity"] = {"data": str(eval_data), "seqlen": eval_seqlen, "windows": dense["windows"],
                             "dense": dense["perplexity"], "pruned": sparse["perplexity"]}
        if oneshot is not None:
            out["perplexity"]["one_shot"] = evaluate(oneshot, eval_data, eval_seqlen, max_segments)["perplexity"]
        log(f"perplexity on {eval_data}: dense {dense['perplexity']:.3f}, 2:4 {sparse['perplexity']:.3f}"
            + (f" (one-shot {out['perplexity']['one_shot']:.3f})" if oneshot is not None else ""))
    return out


def measure_speed(folder, opts: GpuOptions, log) -> dict:
    """Prefill latency, 2:4 kernels vs the same weights dense, when a CUDA GPU is present."""
    import torch

    if not torch.cuda.is_available():
        log("benchmark skipped: no CUDA GPU")
        return {"skipped": "no CUDA GPU on this machine"}
    from ..measure.prefill import benchmark_prefill

    batch, seqlen = opts.bench_batch, opts.bench_seqlen
    res = benchmark_prefill({"2:4": folder}, runtimes=["torch-cuda", "torch-sparse24"], batch=batch,
                            seqlen=seqlen, warmup=opts.warmup, iterations=opts.iterations, threads=opts.threads,
                            progress=False, log=log)
    median = {r["runtime"]: r["median_ms"] for r in res["rows"]}
    res["gpu"] = torch.cuda.get_device_name()
    res["speedup"] = median["torch-cuda"] / median["torch-sparse24"]
    log(f"prefill {batch}x{seqlen} on {res['gpu']}: dense {median['torch-cuda']:.2f} ms, "
        f"2:4 {median['torch-sparse24']:.2f} ms ({res['speedup']:.2f}x)")
    return res


def gpu_sections(r: dict) -> list[tuple[str, str]]:
    """report.md's sections, from the report dict."""
    e, v, b, rec = r["export"], r["verify"], r["benchmark"], r["recipe"]
    summary = "\n".join([
        f"- Model `{r['model']}`, pruned one-shot with {PRUNERS[rec['method']].title}, pattern {rec['pattern']} "
        f"(calibration `{rec['calib']}`, {rec['nsamples']} x {rec['seqlen']} tokens): "
        f"{r['prune']['matrices']} matrices at {r['prune']['sparsity']:.1%}.",
        f"- `{r['output']}/` is a compressed-tensors `{e['format']}` checkpoint, global sparsity "
        f"{e['global_sparsity']:.1%}: weights {e['weight_bytes'] / 2**20:.1f} MiB against "
        f"{e['dense_weight_bytes'] / 2**20:.1f} MiB dense ({1 - e['size_ratio']:.1%} smaller).",
        "- It reads with compressed-tensors <= 0.14 (0.14.0.1 is the last release with the sparse "
        "compressors) and serves with vLLM <= 0.18; sparse-export's `eval` and `benchmark` read it too.",
        "- **Warning: transformers 5 with compressed-tensors >= 0.15 loads this folder without an error but with "
        "random weights** in every compressed layer (the sparse compressors are gone there). Load it with "
        "transformers 4.57 + compressed-tensors 0.14.0.1 (+ psutil, accelerate) and "
        "`from_pretrained(folder, torch_dtype=torch.float32)` (its default float16 changes the weights); "
        "see docs/gpu.md.",
    ])
    checks = "\n".join([
        f"- Round trip, weights read back against the pruned model: sparse-export "
        f"{v['round_trip']['sparse_export']}; compressed-tensors {v['round_trip']['compressed_tensors']}.",
        f"- 2:4 counted in the written safetensors: {v['pattern']['violations']} groups with more than 2 "
        f"nonzeros among {v['pattern']['groups']} groups of 4 in {v['pattern']['matrices']} matrices.",
    ])
    out = [("Summary", summary), ("Verification", checks)]
    rc = r.get("recovery")
    if rc:
        how = ("block-wise: each layer's kept weights fitted to the dense layer's outputs right after it was "
               "pruned" if rc["method"] == "blockwise" else
               f"distillation from the dense model on `{rc['data']}`: {rc['steps']} steps, {rc['tokens']} tokens, "
               f"{rc['train_cpu_s'] / 60:.1f} CPU-minutes, peak {rc['peak_memory_gib']:.2f} GiB")
        out.append(("Recovery", f"- `{r['output']}/` holds the recovered model, the 2:4 mask unchanged ({how})."))
    p = v["perplexity"]
    if p:
        names = [("dense", "dense")] + ([("2:4 one-shot", "one_shot")] if "one_shot" in p else []) + \
            [("2:4 recovered" if rc else "2:4", "pruned")]
        rows = [{"model": m, "perplexity": p[k]} for m, k in names]
        out.append(("Perplexity", f"`{p['data']}`, {p['windows']} windows of {p['seqlen']} tokens.\n\n"
                    + table(rows, [("model", "model"), ("perplexity", "perplexity")])))
    if "skipped" in b:
        out.append(("Speed", f"Skipped: {b['skipped']}."))
    else:
        c = b["config"]
        out.append(("Speed", f"Prefill over {c['batch']} x {c['seqlen']} tokens on {b['gpu']}, {c['warmup']} "
                    f"warmup + {c['iterations']} timed runs; `torch-cuda` is the same weights dense (cuBLAS).\n\n"
                    + table(b["rows"], [("runtime", "runtime"), ("version", "version"), ("median ms", "median_ms"),
                                        ("p90 ms", "p90_ms"), ("tokens/s", "tokens_per_s")])
                    + f"\n\n2:4 speedup: {b['speedup']:.2f}x"))
    return out
