"""`prune-and-export --target cpu`: from a model to a verified, benchmarked deployment, in one atomic
output folder. The steps, in order, each a function below:

  load_dense       the original model; dense deployment onnx-dense/ and its torch reference
  prune_step       pruned-model/ (the pruned checkpoint + sparse_export.json)
  deploy           onnx-sparse/ (and onnx-int8/ with --int8) with their torch references
  prefill_step     every runtime on every deployment, timed interleaved; outputs checked against torch
  generation_step  dense-kv/, sparse-kv/ and generate.png: decode speed (skipped with --no-generate)
  report           report.md, report.json, latency.png

A model too large to hold in memory (the export streams: onnx_stream.choose_stream, --stream,
--memory-budget) takes the streamed path instead of the first three steps (streamed_steps): the prune
and every export run one decoder layer at a time from the safetensors shards, perplexity is measured
streamed, and what needs a whole-model torch forward is left out (cpu_large.SKIPPED_WHEN_STREAMED).
With --skip-fp32, or when the fp32 graphs would not fit (cpu_large.plan_cpu_run), only the INT8 graph
is exported and benchmarked.

The folder is built in a temporary folder beside --out and renamed at the end: a failure in any
step leaves nothing at --out.
"""

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import accuracy, archs, data, models
from ..errors import UserError
from ..evaluate import evaluate
from ..export.int8_calib import fake_int8
from ..export.onnx_int8 import ACT_NSAMPLES, ACT_SEQLEN, OUTLIER_RATIO, prepare_int8, write_int8_deployment
from ..export.onnx_kv import export_kv_onnx
from ..export.onnx_plain import write_deployment
from ..export.onnx_stream import export_streamed
from ..export.validate import LOGITS_TOLERANCE, agreement, fp32_tolerance, int8_tolerance, reference_output
from ..measure.generation import benchmark_generation, plot_generation
from ..measure.machine import trust_line
from ..measure.prefill import benchmark_prefill, save_prefill
from ..outputs import atomic_dir, library_versions, read_meta, relocate, relocate_meta_files
from ..pruning.jobs import prune
from ..report import write_report
from ..runtimes import CPU_RUNTIMES, GENERATE_RUNTIMES, get_runtime, installed
from .cpu_large import CpuPlan, kv_supported, plan_cpu_run
from .cpu_report import PAPER_OPT_2_7B, cpu_sections
from .options import CpuOptions
from .recovery_step import distill

PLOT = "latency.png"
HELD_OUT = (4, 128)   # windows x tokens the accuracy section compares dense and pruned on


@dataclass
class _Run:
    """What the steps share: the model spec, options, the temporary output folder and the results."""

    model: str
    opts: CpuOptions
    tmp: Path
    log: object
    runtimes: list
    inputs: tuple = None
    inputs_note: str = ""
    folders: dict = field(default_factory=dict)      # label -> deployment folder
    reference: dict = field(default_factory=dict)    # label -> torch output for `inputs`
    tolerance: dict = field(default_factory=dict)    # label -> max |engine - torch| accepted on `inputs`
    exports: dict = field(default_factory=dict)      # label -> deployment metadata
    ppl: dict = field(default_factory=dict)          # label -> perplexity result
    prune_meta: dict = None
    held_out: object = None                          # token windows for the accuracy section
    dense_logprobs: object = None
    accuracy: dict = field(default_factory=dict)     # label -> distribution shift; "completions", "held_out"
    plan: CpuPlan = None                             # streamed or in memory; fp32 graphs or not
    recovery: dict = None                            # --recover distill: recover()'s report

    def step_log(self, msg):  # steps write into the temporary folder: leave out their "wrote" lines
        if not str(msg).startswith("wrote "):
            self.log(msg)


def run_cpu_target(model: str, out, opts: CpuOptions, log=print) -> dict:
    """Prune, export dense and sparse ONNX, verify, benchmark, report. Returns report.json's dict.

    An engine that crashes in a measurement is retried once on one thread and otherwise recorded in the
    report: the artifacts and the other results are kept (exit 0, with a warning line)."""
    opts.validate()
    runtimes = check_inputs(model, opts)
    plan = plan_cpu_run(str(model), opts, runtimes)
    if opts.recover and plan.streamed:
        raise UserError(f"--recover {opts.recover} trains the whole model in memory; {model} takes the streamed path")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with atomic_dir(out, opts.force) as tmp:
        run = _Run(str(model), opts, Path(tmp), log, plan.runtimes, plan=plan)
        for note in plan.notes + ([f"fp32 graphs left out: {plan.skip_fp32}"] if plan.skip_fp32 else []):
            log(note)
        if plan.streamed:
            gen_skip = streamed_steps(run)
        else:
            gen_skip = load_dense(run)
            prune_step(run)
            deploy(run)
        if gen_skip is None and plan.skip_fp32 and not plan.streamed:
            gen_skip = "INT8 KV-cache graphs are made on the streamed path; here the fp32 graphs are left out"
        result = prefill_step(run)
        report = _report_dict(run, result)
        report["generate"] = generation_results(run, gen_skip)
        report["warnings"] = _warnings(run, report)
        report = relocate(report, run.tmp)                        # paths relative to the output folder
        relocate_meta_files(run.tmp, Path(out).resolve())         # the deployments' own JSON: final paths
        write_report(run.tmp, _title(run), cpu_sections(report, str(out)), report, plot=PLOT)
    outputs = ["pruned-model/"] + [f"onnx-{label}/" for label in ("dense", "dense-int8", "sparse", "int8")
                                   if label in run.folders]
    gen = report["generate"]
    outputs += ([] if gen_skip else ["dense-kv/", "sparse-kv/"]) + (["generate.png"] if gen.get("rows") else [])
    log(f"wrote {out} ({', '.join(outputs + ['report.md', 'report.json', PLOT])})")
    return report


def check_inputs(model: str, opts: CpuOptions) -> list[str]:
    """The model spec, data sources and runtimes, before any work. Returns the runtimes to use."""
    models.check_model(model)
    data.check_source(opts.recipe.calib, allow_self=True)
    if opts.eval_data is not None:
        data.check_source(opts.eval_data)
    runtimes = list(opts.runtimes or [n for n in CPU_RUNTIMES if installed(n)])
    for name in runtimes:
        get_runtime(name)  # unknown or missing engine: fail before any work
    return runtimes


def _deploy_fp32(run: _Run, label: str, spec, m, tok):
    """Deployment folder `label` of the in-memory model m, its torch reference and perplexity."""
    m.float()  # what the ONNX graph computes in
    if run.opts.eval_data is not None:
        run.log(f"perplexity of the {label} model on {run.opts.eval_data}")
        run.ppl[label] = evaluate(spec, run.opts.eval_data, run.opts.eval_seqlen, run.opts.max_segments,
                                  model=m, tokenizer=tok)
    run.reference[label] = reference_output(m, run.opts.logits, *run.inputs)
    if run.plan is not None and run.plan.skip_fp32:
        return  # no graph; the reference stays for the int8 tolerance
    run.folders[label] = run.tmp / f"onnx-{label}"
    run.exports[label] = write_deployment(m, tok, run.folders[label], run.opts.logits, source=spec,
                                          log=run.step_log)
    # the export's own check needed the fp32-rounding allowance (a float64 copy of the model): measure it again
    # on the benchmark inputs; otherwise the fixed tolerance, and no copy
    widened = "fp32_noise" in (run.exports[label].get("validation") or {})
    run.tolerance[label] = (fp32_tolerance(m, run.opts.logits, *run.inputs, run.reference[label]) if widened
                            else LOGITS_TOLERANCE)


def load_dense(run: _Run) -> str | None:
    """Load the original model, pick the benchmark inputs and the held-out tokens, write onnx-dense/.
    Returns why generation is skipped (None: it runs)."""
    o = run.opts
    run.log(f"loading {run.model}")
    dense, tok = models.load_model(run.model)
    models.decoder_layers(dense)  # unsupported architecture: fail before any work
    gen_skip = _generation_skip(dense, o, run.runtimes)
    run.inputs, run.inputs_note = _text_inputs(o.eval_data or o.recipe.calib, tok, o.bench_batch, o.bench_seqlen,
                                               dense.config.vocab_size)
    dense.float()
    run.held_out, source = _held_out(dense, tok, o)
    run.log(f"accuracy: dense next-token distributions on {run.held_out.numel()} held-out tokens ({source})")
    run.dense_logprobs = accuracy.next_token_logprobs(dense, run.held_out)
    run.accuracy = {"held_out": {"source": source, "tokens": run.held_out.numel()},
                    "completions": {"prompts": list(accuracy.PROMPTS),
                                    "dense": accuracy.greedy_completions(dense, tok)}}
    _deploy_fp32(run, "dense", run.model, dense, tok)
    del dense
    gc.collect()
    return gen_skip


def _held_out(model, tok, o: CpuOptions):
    """Tokens the accuracy section compares on: the evaluation text when given, else text the dense model
    writes itself from a seed other than the calibration's (held out from calibration either way)."""
    n, L = HELD_OUT
    if o.eval_data is not None:
        windows = data.eval_windows(o.eval_data, tok, L, max_segments=n)
        return windows, f"first {windows.shape[0]} x {L} tokens of {o.eval_data}"
    seed = o.recipe.seed + 1000
    return data.self_generated(model, tok, n, L, seed), f"{n} x {L} tokens the dense model wrote (seed {seed})"


def _measure_accuracy(run: _Run, label: str, model, tok) -> None:
    """Distribution shift of `model` from the dense model, and its greedy completions."""
    shift = accuracy.distribution_shift(run.dense_logprobs, accuracy.next_token_logprobs(model, run.held_out))
    run.accuracy[label] = shift
    run.accuracy["completions"][label] = accuracy.greedy_completions(model, tok)
    run.log(f"accuracy of the {label} model: top-1 agreement with dense {shift['top1_agreement']:.1%}, "
            f"KL {shift['kl_nats_per_token']:.4f} nats/token")


def prune_step(run: _Run) -> None:
    """pruned-model/: the pruned checkpoint."""
    run.prune_meta = prune(run.model, run.tmp / "pruned-model", run.opts.recipe, force=True,
                           threads=run.opts.threads, log=run.step_log, stream=run.opts.stream,
                           after_layer=run.opts.recovery_hook())
    if run.opts.recover == "distill":
        _recover_distill(run)


def _recover_distill(run: _Run) -> None:
    """--recover distill: the one-shot model moves to oneshot-model/ and pruned-model/ becomes the model
    distilled from the dense one with the mask fixed (so every later step deploys the recovered model); the
    one-shot model is measured beside it (accuracy, perplexity)."""
    o = run.opts
    oneshot = run.tmp / "oneshot-model"
    (run.tmp / "pruned-model").rename(oneshot)
    run.recovery = distill(run.model, oneshot, run.tmp / "pruned-model", o, run.tmp / "recover-ckpt", run.step_log)
    model, tok = models.load_model(oneshot)
    model.float()
    if run.held_out is not None:
        _measure_accuracy(run, "one-shot", model, tok)
    if o.eval_data is not None:
        run.log(f"perplexity of the one-shot model on {o.eval_data}")
        run.ppl["one-shot"] = evaluate(oneshot, o.eval_data, o.eval_seqlen, o.max_segments, model=model,
                                       tokenizer=tok)
    del model
    gc.collect()


def deploy(run: _Run) -> None:
    """onnx-sparse/ (its export checks every ONNX matrix against the checkpoint) and, with --int8,
    onnx-int8/."""
    pruned_dir = run.tmp / "pruned-model"
    sparse, tok = models.load_model(pruned_dir)
    sparse.float()
    _measure_accuracy(run, "sparse", sparse, tok)
    _deploy_fp32(run, "sparse", pruned_dir, sparse, tok)
    if run.opts.int8:
        run.folders["int8"] = run.tmp / "onnx-int8"
        run.exports["int8"] = _deploy_int8(run, sparse, tok, pruned_dir)
    del sparse
    gc.collect()


def _deploy_int8(run: _Run, model, tok, pruned_dir):
    """onnx-int8/ from the jointly pruned model; its reference and perplexity come from the torch
    model with the same integer weights and its Linear inputs fake-quantized like the graph's."""
    o, r = run.opts, run.opts.recipe
    n, L = min(r.nsamples, ACT_NSAMPLES), min(r.seqlen, ACT_SEQLEN)
    run.log(f"int8: activation ranges from {n} x {L} calibration tokens")
    windows = data.calibration_windows(r.calib, tok, n, L, r.seed, model=model)
    scales, qparams, attn, how, fp32 = prepare_int8(model, read_meta(pruned_dir), windows,
                                                    attention=not o.fp32_attention, max_error=o.int8_max_error)
    if fp32:
        why = "outlier inputs" + (f" or int8 input error > {o.int8_max_error:g}" if o.int8_max_error else "")
        run.log(f"int8: {len(fp32)} Linear layer(s) with {why} stay fp32")
    with fake_int8(model, qparams, attn):
        if o.eval_data is not None:
            run.log(f"perplexity of the int8 model on {o.eval_data}")
            run.ppl["int8"] = evaluate(pruned_dir, o.eval_data, o.eval_seqlen, o.max_segments, model=model,
                                       tokenizer=tok)
        run.reference["int8"] = reference_output(model, o.logits, *run.inputs)
        _measure_accuracy(run, "int8", model, tok)
    extra = {"weight_source": how, "outlier_ratio": OUTLIER_RATIO, "max_error": o.int8_max_error,
             "calibration": {"source": str(r.calib), "nsamples": n, "seqlen": L, "seed": r.seed, "range": "min/max"}}
    return write_int8_deployment(model, tok, run.folders["int8"], scales, qparams, attn, o.logits,
                                 source=pruned_dir, extra=extra, log=run.log)


def streamed_steps(run: _Run) -> str | None:
    """The large-model path instead of load_dense, prune_step and deploy: benchmark inputs from the folder's
    tokenizer, then onnx-dense/, pruned-model/, onnx-sparse/ (and onnx-int8/), each streamed one decoder
    layer at a time and checked by its export against torch run layer by layer; perplexity streamed.
    Returns why generation is skipped (None: it runs)."""
    o, folder = run.opts, run.plan.folder
    run.log(f"{run.model} takes the streamed path (one decoder layer at a time); skipped: whole-model torch "
            f"references, the accuracy section and completions")
    tok = models.folder_tokenizer(folder)
    gen_skip = _generation_skip_streamed(run)
    run.inputs, run.inputs_note = _text_inputs(o.eval_data or o.recipe.calib, tok, o.bench_batch, o.bench_seqlen,
                                               models.read_config(folder)["vocab_size"])
    _stream_fp32(run, "dense", folder)
    if run.plan.skip_fp32:   # the baseline: the dense model's INT8 graph (weights rounded per row)
        _stream_int8(run, folder, "dense-int8")
    prune_step(run)
    pruned_dir = run.tmp / "pruned-model"
    _stream_fp32(run, "sparse", pruned_dir)
    if o.int8:
        _stream_int8(run, pruned_dir, "int8")
    return gen_skip


def _stream_fp32(run: _Run, label: str, src) -> None:
    """Perplexity of the folder `src` (streamed) and, unless the fp32 graphs are left out, onnx-`label`/
    exported one layer at a time."""
    o = run.opts
    if o.eval_data is not None:
        run.log(f"perplexity of the {label} model on {o.eval_data} (streamed)")
        run.ppl[label] = evaluate(src, o.eval_data, o.eval_seqlen, o.max_segments, stream=True)
    if run.plan.skip_fp32:
        return
    run.folders[label] = run.tmp / f"onnx-{label}"
    run.exports[label] = export_streamed(src, run.folders[label], kind="plain", logits=o.logits, force=True,
                                         budget=run.plan.budget, log=run.step_log)


def _int8_options(run: _Run) -> dict:
    """The streamed INT8 exports' calibration: the in-memory path's (the recipe's text, at most
    ACT_NSAMPLES x ACT_SEQLEN tokens)."""
    o, r = run.opts, run.opts.recipe
    return {"calib": r.calib, "nsamples": min(r.nsamples, ACT_NSAMPLES), "seqlen": min(r.seqlen, ACT_SEQLEN),
            "seed": r.seed, "percentile": None, "outlier_ratio": OUTLIER_RATIO, "attention": not o.fp32_attention}


def _stream_int8(run: _Run, src: Path, label: str) -> None:
    """onnx-`label`/ from the folder `src`, streamed: each layer's activation ranges measured as it is read.
    label "int8": the pruned model; "dense-int8": the dense model, the baseline when the fp32 graphs are
    left out."""
    int8 = _int8_options(run)
    run.log(f"int8 ({label}): activation ranges from {int8['nsamples']} x {int8['seqlen']} calibration tokens, "
            f"one layer at a time")
    run.folders[label] = run.tmp / f"onnx-{label}"
    run.exports[label] = export_streamed(src, run.folders[label], kind="int8", logits=run.opts.logits, int8=int8,
                                         force=True, budget=run.plan.budget, log=run.step_log)
    if label == "int8" and run.opts.eval_data is not None:
        run.plan.notes.append("int8 perplexity not measured: it needs the fake-quantized model whole in torch")


def _recorded_agreement(run: _Run) -> list[dict]:
    """The streamed path's correctness rows: what each export recorded when it ran its graph on ONNX
    Runtime against torch run one layer at a time (it raised had they disagreed)."""
    out = []
    for label, meta in run.exports.items():
        v = meta.get("validation") or {}
        out.append({"model": label, "runtime": v.get("runtime", "onnxruntime"), "max_abs_diff": v.get("max_abs_diff"),
                    "max_abs_output": v.get("max_abs_output"), "tolerance": v.get("tolerance"),
                    "inputs": v.get("inputs"), "layers_checked": v.get("layers_checked"), "note": v.get("note")})
    return out


def _generation_skip_streamed(run: _Run) -> str | None:
    """_generation_skip for the streamed path, from the folder's config (no model is loaded)."""
    if not run.opts.generate:
        return "--no-generate"
    if not set(run.runtimes) & set(GENERATE_RUNTIMES):
        return f"it runs on {' or '.join(GENERATE_RUNTIMES)}, and neither is among the runtimes"
    return kv_supported(run.plan.folder)


def prefill_step(run: _Run) -> dict:
    """Every runtime on every deployment, interleaved; outputs against torch; latency.png."""
    o = run.opts
    streamed = run.plan is not None and run.plan.streamed
    run.log(f"benchmark: {', '.join(run.runtimes)} on {o.bench_batch}x{o.bench_seqlen} tokens")
    base = next((b for b in ("dense", "dense-int8") if b in run.folders), None)
    result = benchmark_prefill(run.folders, run.runtimes, baseline=base,
                               batch=o.bench_batch, seqlen=o.bench_seqlen, warmup=o.warmup, iterations=o.iterations,
                               threads=o.threads, logits=o.logits, inputs=run.inputs, keep_outputs=not streamed,
                               on_crash="record", log=run.log)
    run.log(trust_line(result["trust"]))
    rows = result["rows"]
    if streamed:
        agree = _recorded_agreement(run)
    else:
        agree = [a for label in ("dense", "sparse") if label in run.folders
                 for a in agreement([r for r in rows if r["model"] == label], run.reference, run.tolerance[label])]
    if o.int8 and not streamed:
        agree += agreement([r for r in rows if r["model"] == "int8"], run.reference,
                           int8_tolerance(run.reference["int8"], run.reference["sparse"]))
    save_prefill(result, plot_path=run.tmp / PLOT)
    result["rows"] = [{k: v for k, v in r.items() if k != "output"} for r in rows]
    result["agreement"] = agree
    return result


def generation_step(dense_model, sparse_model, out_dir, runtimes: list[str], opts: CpuOptions,
                    log=print, budget: int | None = None, int8: dict | None = None) -> dict:
    """KV-cache graphs of the dense and pruned models (out_dir/dense-kv, out_dir/sparse-kv), decode speed
    on `runtimes` (a crashing engine is retried on one thread, then recorded), out_dir/generate.png.
    budget: export the graphs streamed, one layer at a time, with this check budget (bytes); None: in memory.
    int8: calibration options: INT8 KV-cache graphs (both models) instead of fp32.
    Returns the generation benchmark's result."""
    out_dir = Path(out_dir)
    log(f"generation benchmark: {', '.join(runtimes)}, {opts.prompt_tokens}-token prompt, "
        f"{opts.new_tokens} new tokens")
    folders = {"dense": out_dir / "dense-kv", "sparse": out_dir / "sparse-kv"}
    for src, dst in ((dense_model, folders["dense"]), (sparse_model, folders["sparse"])):
        if budget is None:
            export_kv_onnx(src, dst, opts.prompt_tokens + opts.new_tokens, force=True, log=log, int8=int8)
        else:
            export_streamed(src, dst, kind="kv", max_length=opts.prompt_tokens + opts.new_tokens, int8=int8,
                            force=True, budget=budget, log=log)
    result = benchmark_generation(folders, runtimes, "dense", opts.prompt_tokens, opts.new_tokens,
                                  iterations=min(opts.iterations, 3), threads=opts.threads, on_crash="record",
                                  log=log)
    log(trust_line(result["trust"]))
    if result["rows"]:
        plot_generation(result, out_dir / "generate.png")
    return result


def generation_results(run: _Run, gen_skip: str | None) -> dict:
    """generation_step unless skipped, and with --int8 or --wbits our own runtimes on the model folders
    (sparse_cpu_generation); {"skipped": why} when neither runs."""
    streamed = run.plan is not None and run.plan.streamed
    dense = run.plan.folder if streamed else run.model
    ours = run.opts.generate and bool(run.opts.int8 or run.opts.recipe.wbits)
    if gen_skip:
        run.log(f"generation benchmark{' (KV-cache graphs)' if ours else ''} skipped: {gen_skip}")
        if not ours:
            return {"skipped": gen_skip}
        result = None
    else:
        int8 = _int8_options(run) if run.plan is not None and run.plan.skip_fp32 else None
        result = generation_step(dense, run.tmp / "pruned-model", run.tmp,
                                 [r for r in run.runtimes if r in GENERATE_RUNTIMES], run.opts, run.step_log,
                                 budget=run.plan.budget if streamed else None, int8=int8)
    if ours:
        result = sparse_cpu_generation(dense, run.tmp / "pruned-model", run.opts, result, run.log)
        if gen_skip:
            result["kv_skipped"] = gen_skip
        if result["rows"]:
            plot_generation(result, run.tmp / "generate.png")
    return result


def sparse_cpu_generation(dense_model, pruned_dir, opts: CpuOptions, result: dict | None, log=print) -> dict:
    """Decode speed of our runtimes on the model folders themselves (no graph): sparse-cpu on pruned_dir
    and sparse-cpu-dense on the dense model, added to `result` (generation_step's; None: a new one).
    A failure is recorded as a crash: what the earlier steps produced stays."""
    from ..measure import machine
    from ..measure.generation import measure_our_runtime

    if result is None:
        result = {"config": {"mode": "generate", "batch": 1, "prompt_tokens": opts.prompt_tokens,
                             "new_tokens": opts.new_tokens, "iterations": min(opts.iterations, 3),
                             "threads": opts.threads or "all", "baseline": "dense"},
                  "rows": [], "crashes": [], "trust": None, "versions": library_versions()}
    log(f"generation benchmark: sparse-cpu on pruned-model/, sparse-cpu-dense on the dense model, "
        f"{opts.prompt_tokens}-token prompt, {opts.new_tokens} new tokens")
    before = machine.snapshot()
    try:
        rows = measure_our_runtime(dense_model, pruned_dir, opts.prompt_tokens, opts.new_tokens,
                                   iterations=min(opts.iterations, 3), threads=opts.threads)
    except Exception as e:  # noqa: BLE001 - an optional measurement: record it, keep the artifacts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log(f"sparse-cpu generation failed: {first}")
        result["crashes"].append({"runtime": "sparse-cpu", "models": ["dense", "sparse"],
                                  "threads": opts.threads or "all", "error": f"{type(e).__name__}: {first}",
                                  "retry": "none (not an engine crash to retry on one thread)"})
        return result
    trust = machine.trust(before, machine.snapshot(), rows, spread_of=("decode_ms_p90", "decode_ms_min"))
    log(trust_line(trust))
    result["rows"] += rows
    if result["trust"] is None:
        result["trust"] = trust
    else:   # one trust line for the section: the KV-cache graphs' numbers and ours
        result["trust"]["warnings"] = list(dict.fromkeys(result["trust"]["warnings"] + trust["warnings"]))
        result["trust_sparse_cpu"] = trust
    return result


def _warnings(run: _Run, report: dict) -> list[str]:
    """Crashes and doubtful timings, once more on the terminal and at the top of the report."""
    out = []
    for name, res in (("prefill", report["benchmark"]), ("generation", report.get("generate") or {})):
        for c in res.get("crashes", []):
            out.append(f"{c['runtime']} crashed in the {name} benchmark ({c['error']}); retry: {c['retry']}")
        for w in (res.get("trust") or {}).get("warnings", []):
            out.append(f"{name} timings: {w}; rerun on a quiet machine before trusting the speedups")
    for w in out:
        run.log(f"warning: {w}")
    return out


def _title(run: _Run) -> str:
    return f"{run.model}: {run.prune_meta['pruned_sparsity']:.0%} {run.opts.recipe.pruner.title} for CPU"


def _report_dict(run: _Run, result: dict) -> dict:
    o, p = run.opts, run.prune_meta
    return {
        "target": "cpu", "model": run.model, "recipe": o.recipe.to_dict(), "logits": o.logits,
        "prune": {**{k: p.get(k) for k in ("pruned_sparsity", "calibration_mode", "timing", "allocation")},
                  "streamed": bool(p.get("streamed"))},
        "export": {k: {**{f: e.get(f) for f in ("prunable_sparsity", "prunable_matrices", "all_weights_sparsity",
                                                  "weight_initializers", "external_data", "export_s")},
                       "streamed": "streamed" in e,
                       **({"quant": _quant_summary(e["int8"])} if "int8" in e else {})}
                   for k, e in run.exports.items()},
        "verify": {"inputs": run.inputs_note, "agreement": result.pop("agreement"), "perplexity": run.ppl},
        "plan": run.plan.to_dict() if run.plan is not None else None,
        "accuracy": run.accuracy,
        **({"recovery": run.recovery} if run.recovery else {}),
        "benchmark": result,
        "paper_opt_2_7b_deepsparse": {str(k): v for k, v in PAPER_OPT_2_7B.items()},
        "versions": library_versions(),
    }


def _text_inputs(source, tokenizer, batch, seqlen, vocab):
    """(ids, mask) from real text, or random tokens when there is no text source."""
    if source is None or str(source) == "self":
        return data.random_tokens(vocab, batch, seqlen), "random tokens"
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments=batch)
    if windows.shape[0] < batch:
        raise UserError(f"{source} has fewer than {batch} windows of {seqlen} tokens for the benchmark")
    ids = windows.numpy().astype(np.int64)
    return (ids, np.ones_like(ids)), f"{batch} window(s) of {source}"


def _generation_skip(model, opts: CpuOptions, runtimes) -> str | None:
    """Why the generation benchmark is left out (None: it runs)."""
    if not opts.generate:
        return "--no-generate"
    if not set(runtimes) & set(GENERATE_RUNTIMES):
        return f"it runs on {' or '.join(GENERATE_RUNTIMES)}, and neither is among the runtimes"
    if not archs.arch_of(model).kv_cache:
        return (f"the KV-cache export does not support architecture '{archs.model_type(model)}' "
                f"(supported: {', '.join(archs.KV_CACHE)})")
    return None


def _quant_summary(meta_int8):
    """The int8 metadata without its per-tensor activation and attention qparams."""
    out = {x: y for x, y in meta_int8.items() if x != "activations"}
    out["attention"] = {x: y for x, y in meta_int8["attention"].items() if x != "qparams"}
    return out
