"""`prune-and-export`: from a model to a verified, benchmarked deployment, in one atomic output folder.

CPU target, output folder:
  pruned-model/   the SparseGPT-pruned checkpoint (save_pretrained folder + sparse_export.json)
  onnx-dense/     deployment folder of the original model
  onnx-sparse/    deployment folder of the pruned model
  report.md, report.json, latency.png
The folder is built in a temporary folder beside --out and renamed at the end: a failure in any
step (pruning, export, verification, benchmark) leaves nothing at --out.
"""

import gc

import numpy as np
import torch

from . import bench, data, jobs, models
from .errors import UserError
from .generate import RUNTIMES as GEN_RUNTIMES
from .onnx_export import ExportModule, write_deployment
from .outputs import atomic_dir, library_versions
from .prune import Recipe
from .report import fmt, table, write_report

TARGETS = ("cpu", "gpu")
# SparseGPT paper (Frantar & Alistarh 2023): end-to-end DeepSparse speedup of OPT-2.7B on CPU
PAPER_OPT_2_7B = {0.4: 1.57, 0.5: 1.82, 0.6: 2.16}
# Largest |logit - torch logit| accepted from an ONNX engine. Measured on SmolLM2-135M, 1x400 tokens
# of WikiText-2 (last-token logits, max |logit| 16.7): ONNX Runtime 2.8e-5, DeepSparse 3.6e-5.
LOGITS_TOLERANCE = 1e-3
# The int8 graph against the torch model with the same integer weights and fake-quantized Linear
# inputs: tiny models agree to ~1e-7, but on a real model one activation that lands on the other side
# of a rounding step (from fp32 differences of 1e-6 in attention) shifts the next layer's inputs across
# many more, so engine and torch end up differing by about as much as quantization itself moves the
# logits (SmolLM2-135M, 1x400 tokens: max |ORT - torch| 2.9-4.6 and DeepSparse 2.4-3.3, while the
# fake-quant model differs from the same weights with fp32 activations by 2.5-5.9). Accepted: at most
# INT8_NOISE_FACTOR times that quantization effect; wrong scales or a broken graph give far more.
INT8_NOISE_FACTOR = 2.0
PLOT = "latency.png"


def prune_and_export(model, out, target="cpu", **options):
    """Run the target's pipeline. Options the chosen target does not take are an error."""
    if target == "gpu":
        if options.pop("int8", False) or options.pop("fp32_attention", False):
            raise UserError("--int8 is for the cpu target (int8 matmuls in DeepSparse / ONNX Runtime); "
                            "the gpu target writes 2:4 fp16 checkpoints")
        from .gpu_target import run_gpu_target  # only the GPU target needs its dependencies

        return run_gpu_target(model, out, **options)
    if target != "cpu":
        raise UserError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    return run_cpu_target(model, out, **options)


def reference_output(model, logits, ids, mask):
    """What torch computes for the graph's output, from the model in memory."""
    with torch.inference_mode():
        return ExportModule(model, logits).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()


def agreement(rows, reference, tolerance=LOGITS_TOLERANCE):
    """Max |output - torch| per benchmark row (outputs kept by bench.benchmark). Raises past `tolerance`."""
    out = []
    for r in rows:
        ref = reference[r["model"]]
        diff = float(np.abs(r["output"].astype(np.float32) - ref).max())
        out.append({"model": r["model"], "runtime": r["runtime"], "max_abs_diff": diff,
                    "max_abs_output": float(np.abs(ref).max()), "tolerance": tolerance})
        if not diff <= tolerance:
            raise UserError(f"{r['runtime']} disagrees with torch on the {r['model']} model: "
                            f"max |difference| {diff:.2e} > tolerance {tolerance:.0e}")
    return out


def _text_inputs(source, tokenizer, batch, seqlen, vocab):
    """(ids, mask) from real text, or random tokens when there is no text source."""
    if source is None or str(source) == "self":
        return bench.random_inputs(vocab, batch, seqlen), "random tokens"
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments=batch)
    if windows.shape[0] < batch:
        raise UserError(f"{source} has fewer than {batch} windows of {seqlen} tokens for the benchmark")
    ids = windows.numpy().astype(np.int64)
    return (ids, np.ones_like(ids)), f"{batch} window(s) of {source}"


def run_cpu_target(model, out, sparsity=0.5, pattern=None, calib="c4", nsamples=128, seqlen=2048, seed=0,
                   eval_data=None, eval_seqlen=2048, max_segments=None, bench_batch=1, bench_seqlen=400,
                   warmup=3, iterations=20, runtimes=None, logits="last", ignore=(), force=False,
                   threads=None, int8=False, fp32_attention=False, generate=True, prompt_tokens=256, new_tokens=128,
                   log=print):
    """Prune with SparseGPT, export dense and sparse ONNX, verify, benchmark, report. Returns report.json's dict.

    int8: prune jointly onto the int8 weight grid (wbits=8) and also export onnx-int8/ (attention score
    matmuls int8 too unless fp32_attention).
    generate: also export KV-cache graphs (dense-kv/, sparse-kv/) and benchmark generation.
    """
    from .runtimes import get_runtime, installed

    if fp32_attention and not int8:
        raise UserError("--fp32-attention applies to --int8 only")
    recipe = Recipe(method="sparsegpt", sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples,
                    seqlen=seqlen, seed=seed, ignore=list(ignore), wbits=8 if int8 else None).validate()
    data.check_source(calib, allow_self=True)
    if eval_data is not None:
        data.check_source(eval_data)
    runtimes = list(runtimes or [n for n in bench.CPU_RUNTIMES if installed(n)])
    for name in runtimes:
        get_runtime(name)  # unknown or missing engine: fail before any work

    def step_log(msg):  # steps write into the temporary folder: leave out their "wrote" lines
        if not str(msg).startswith("wrote "):
            log(msg)

    if threads:
        torch.set_num_threads(threads)
    with atomic_dir(out, force) as tmp:
        folders = {"dense": tmp / "onnx-dense", "sparse": tmp / "onnx-sparse"}
        if int8:
            folders["int8"] = tmp / "onnx-int8"
        ppl, reference, exports = {}, {}, {}

        def deploy(label, spec, m, tok):
            m.float()  # what the ONNX graph computes in
            if eval_data is not None:
                log(f"perplexity of the {label} model on {eval_data}")
                ppl[label] = jobs.evaluate(spec, eval_data, eval_seqlen, max_segments, model=m, tokenizer=tok)
            reference[label] = reference_output(m, logits, *inputs)
            exports[label] = write_deployment(m, tok, folders[label], logits, source=spec, log=step_log)

        log(f"loading {model}")
        dense, tok = models.load_model(model)
        models.decoder_layers(dense)  # unsupported architecture: fail before any work
        gen_skip = _generation_skip(dense, generate, runtimes, prompt_tokens, new_tokens)
        inputs, inputs_note = _text_inputs(eval_data or calib, tok, bench_batch, bench_seqlen,
                                           dense.config.vocab_size)
        deploy("dense", model, dense, tok)
        del dense
        gc.collect()

        pruned_dir = tmp / "pruned-model"
        prune_meta = jobs.prune(model, pruned_dir, recipe, force=True, threads=threads, log=step_log)
        sparse, tok = models.load_model(pruned_dir)
        deploy("sparse", pruned_dir, sparse, tok)  # also checks every ONNX matrix against the checkpoint
        if int8:
            exports["int8"] = _deploy_int8(sparse, tok, pruned_dir, folders["int8"], calib, nsamples, seqlen,
                                           seed, eval_data, eval_seqlen, max_segments, logits, inputs,
                                           ppl, reference, not fp32_attention, step_log)
        del sparse
        gc.collect()

        log(f"benchmark: {', '.join(runtimes)} on {bench_batch}x{bench_seqlen} tokens")
        result = bench.benchmark(folders, runtimes, baseline="dense", batch=bench_batch, seqlen=bench_seqlen,
                                 warmup=warmup, iterations=iterations, threads=threads, logits=logits,
                                 inputs=inputs, keep_outputs=True, log=log)
        agree = agreement([r for r in result["rows"] if r["model"] != "int8"], reference)
        if int8:
            noise = float(np.abs(reference["int8"] - reference["sparse"]).max())
            agree += agreement([r for r in result["rows"] if r["model"] == "int8"], reference,
                               max(LOGITS_TOLERANCE, INT8_NOISE_FACTOR * noise))
        bench.save(result, plot_path=tmp / PLOT)
        rows = [{k: v for k, v in r.items() if k != "output"} for r in result["rows"]]

        report = {
            "target": "cpu", "model": str(model), "recipe": recipe.to_dict(), "logits": logits,
            "prune": {k: prune_meta.get(k) for k in ("pruned_sparsity", "calibration_mode", "timing")},
            "export": {k: {**{f: e[f] for f in ("prunable_sparsity", "prunable_matrices", "all_weights_sparsity",
                                                  "weight_initializers", "external_data", "export_s")},
                           **({"quant": _quant_summary(e["int8"])} if "int8" in e else {})}
                       for k, e in exports.items()},
            "verify": {"inputs": inputs_note, "agreement": agree, "perplexity": ppl},
            "benchmark": {**result, "rows": rows},
            "paper_opt_2_7b_deepsparse": {str(k): v for k, v in PAPER_OPT_2_7B.items()},
            "versions": library_versions(),
        }
        sections = _sections(report, rows)
        gen_runtimes = [r for r in runtimes if r in GEN_RUNTIMES]
        if gen_skip:
            log(f"generation benchmark skipped: {gen_skip}")
            report["generate"] = {"skipped": gen_skip}
            if generate:
                sections.append(("Generation", f"Not measured: {gen_skip}."))
        else:
            log(f"generation benchmark: {', '.join(gen_runtimes)}, {prompt_tokens}-token prompt, "
                f"{new_tokens} new tokens")
            from .bench_generate import pipeline_section

            gen = pipeline_section(model, pruned_dir, tmp, gen_runtimes, prompt_tokens, new_tokens,
                                   iterations=min(iterations, 3), threads=threads, log=step_log)
            report["generate"] = gen["result"]
            heading, _, body = gen["markdown"].partition("\n")
            sections.append((heading.lstrip("# "), body))
        title = f"{model}: {prune_meta['pruned_sparsity']:.0%} SparseGPT for CPU"
        write_report(tmp, title, sections, report, plot=PLOT)
    log(f"wrote {out} (pruned-model/, onnx-dense/, onnx-sparse/, {'onnx-int8/, ' if int8 else ''}"
        f"{'' if gen_skip else 'dense-kv/, sparse-kv/, generate.png, '}report.md, report.json, {PLOT})")
    return report


def _generation_skip(model, generate, runtimes, prompt_tokens, new_tokens):
    """Why the generation benchmark is left out (None: it runs). Bad lengths are an error."""
    from .onnx_kv import SUPPORTED

    if not generate:
        return "--no-generate"
    if min(prompt_tokens, new_tokens - 1) < 1:
        raise UserError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
    if not set(runtimes) & set(GEN_RUNTIMES):
        return f"it runs on {' or '.join(GEN_RUNTIMES)}, and neither is among the runtimes"
    arch = models.model_type(model)
    if arch not in SUPPORTED:
        return f"the KV-cache export does not support architecture '{arch}' (supported: {', '.join(SUPPORTED)})"
    return None


def _quant_summary(meta_int8):
    """The int8 metadata without its per-tensor activation and attention qparams."""
    out = {x: y for x, y in meta_int8.items() if x != "activations"}
    out["attention"] = {x: y for x, y in meta_int8["attention"].items() if x != "qparams"}
    return out


def _deploy_int8(model, tok, pruned_dir, folder, calib, nsamples, seqlen, seed, eval_data, eval_seqlen,
                 max_segments, logits, inputs, ppl, reference, attention, log):
    """onnx-int8/ from the jointly pruned model; its reference and perplexity come from the torch
    model with the same integer weights and its Linear inputs fake-quantized like the graph's."""
    from .onnx_int8 import ACT_NSAMPLES, ACT_SEQLEN, OUTLIER_RATIO, prepare_int8, write_int8_deployment
    from .outputs import read_meta
    from .quant import fake_int8

    n, L = min(nsamples, ACT_NSAMPLES), min(seqlen, ACT_SEQLEN)
    log(f"int8: activation ranges from {n} x {L} calibration tokens")
    windows = data.calibration_windows(calib, tok, n, L, seed, model=model)
    scales, qparams, attn, how, fp32 = prepare_int8(model, read_meta(pruned_dir), windows, attention=attention)
    if fp32:
        log(f"int8: {len(fp32)} Linear layer(s) with outlier inputs stay fp32")
    with fake_int8(model, qparams, attn):
        if eval_data is not None:
            log(f"perplexity of the int8 model on {eval_data}")
            ppl["int8"] = jobs.evaluate(pruned_dir, eval_data, eval_seqlen, max_segments, model=model, tokenizer=tok)
        reference["int8"] = reference_output(model, logits, *inputs)
    extra = {"weight_source": how, "outlier_ratio": OUTLIER_RATIO,
             "calibration": {"source": str(calib), "nsamples": n, "seqlen": L, "seed": seed, "range": "min/max"}}
    return write_int8_deployment(model, tok, folder, scales, qparams, attn, logits, source=pruned_dir, extra=extra,
                                 log=log)


def _sections(r, rows):
    e, v, p = r["export"], r["verify"], r["prune"]
    s = p["pruned_sparsity"]
    summary = "\n".join([
        f"- Model `{r['model']}`, pruned one-shot with SparseGPT to {s:.1%} of the decoder-layer weights "
        f"(calibration `{r['recipe']['calib']}`, {r['recipe']['nsamples']} x {r['recipe']['seqlen']} tokens).",
        f"- Sparsity counted in `onnx-sparse/model.onnx`: {e['sparse']['prunable_sparsity']:.2%} over its "
        f"{e['sparse']['prunable_matrices']} prunable matrices; each holds exactly the checkpoint's values, "
        f"so the zero counts equal the checkpoint's matrix by matrix. All weights: "
        f"{e['sparse']['all_weights_sparsity']:.2%} (embeddings and LM head stay dense).",
        f"- Graph output: `{r['logits']}` logits (`last` = last position only, what a prefill needs).",
    ])
    if "int8" in e:
        summary += (
            f"\n- INT8 (`onnx-int8/`): pruned jointly onto the int8 weight grid (SparseGPT rounds each kept "
            f"weight before propagating its error), so `onnx-sparse/` and `onnx-int8/` hold the same weights. "
            f"{e['int8']['quant']['matmul_integer']} of {e['int8']['prunable_matrices']} Linear layers run as "
            f"QuantizeLinear -> MatMulInteger -> Cast -> Mul (activations uint8, static per-tensor ranges "
            f"from calibration); {len(e['int8']['quant']['fp32_linear'])} whose inputs carry massive outliers "
            f"stay fp32. Attention score matmuls (query x key): "
            f"{e['int8']['quant']['attention']['score_matmul']}; softmax, probabilities x values, norms, "
            f"embeddings and the LM head stay fp32. Sparsity counted in the file: "
            f"{e['int8']['prunable_sparsity']:.2%}. Its torch reference and perplexity use the same integer "
            f"weights with the same activations fake-quantized. Engines and torch round a few activations "
            f"differently and those differences spread, so the int8 tolerance is {INT8_NOISE_FACTOR:g}x the "
            f"largest change quantizing the activations makes to the torch logits.")
    agree = table(v["agreement"], [("model", "model"), ("runtime", "runtime"),
                                   ("max abs diff vs torch", "max_abs_diff"),
                                   ("max abs output", "max_abs_output"), ("tolerance", "tolerance")])
    sections = [("Summary", summary), ("Side by side", _side_by_side(v["perplexity"], rows)),
                ("Correctness", f"Outputs on {v['inputs']}, against the torch model in eval mode.\n\n{agree}")]
    if v["perplexity"]:
        ppl = [{**x, "model": k} for k, x in v["perplexity"].items()]
        sections.append(("Perplexity", table(ppl, [("model", "model"), ("data", "data"), ("windows", "windows"),
                                                   ("seqlen", "seqlen"), ("perplexity", "perplexity")])))
    c = r["benchmark"]["config"]
    speed = (f"Forward pass over {c['batch']} x {c['seqlen']} tokens, threads: {c['threads']}, "
             f"{c['warmup']} warmup + {c['iterations']} timed runs, CPU {c['cpu']}. Load time (DeepSparse: "
             f"compilation) is apart from latency. CPU ms: process CPU time per run (all threads).\n\n"
             + bench.table(r["benchmark"]))
    sections.append(("Speed", speed))
    sections.append(("Against the paper", _paper_section(rows, s)))
    return sections


def _side_by_side(ppl, rows):
    """One line per model: perplexity, then latency and speedup over dense on each runtime."""
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    by = {(r["model"], r["runtime"]): r for r in rows}
    head = ["model", "perplexity"] + [f"{rt} {x}" for rt in runtimes for x in ("ms", "x dense")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = [m, fmt(ppl.get(m, {}).get("perplexity"), ".2f")]
        for rt in runtimes:
            r = by.get((m, rt), {})
            cells += [fmt(r.get("median_ms"), ".1f"), fmt(r.get("speedup_vs_baseline"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nLatency: median of the timed runs (see Speed); perplexity: see Perplexity."


def _paper_section(rows, s):
    ds = {r["model"]: r for r in rows if r["runtime"] == "deepsparse"}
    ours = ds.get("sparse", {}).get("speedup_vs_baseline")
    lines = ["| sparsity | DeepSparse speedup | 1/(1-s) limit | share of the limit |", "|---|---|---|---|"]
    lines.append(f"| {s:.0%} (this run) | {fmt(ours, '.2f')}x | {1 / (1 - s):.2f}x | "
                 f"{fmt(ours and ours * (1 - s), '.0%')} |")
    for k, v in PAPER_OPT_2_7B.items():
        lines.append(f"| {k:.0%} (paper, OPT-2.7B) | {v:.2f}x | {1 / (1 - k):.2f}x | {v * (1 - k):.0%} |")
    note = ("The paper's numbers are end-to-end DeepSparse speedups of OPT-2.7B (SparseGPT, Frantar & "
            "Alistarh 2023). 1/(1-s) is the most skipping zero weights can give if weight work were all the work.")
    if ours is None:
        note += " DeepSparse was not among the benchmarked runtimes."
    return "\n".join(lines) + "\n\n" + note
