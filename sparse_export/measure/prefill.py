"""End-to-end latency of one forward pass over batch x seqlen tokens, per runtime and model.

The models of one runtime are loaded together and timed interleaved (every round runs each model
once), so the slow drift of a shared machine hits dense and sparse alike; runs never overlap, so
engines do not compete for the cores. DeepSparse runs in a fresh child process (its timings then do
not depend on what the calling process did before, and a crash of the engine becomes an error
message). Speedups compare medians measured in the same run.
"""

import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import isolate, models
from ..data import random_tokens
from ..errors import EngineCrash, UserError
from ..outputs import cpu_name, library_versions, peak_rss_gib, reset_peak_rss, write_json
from ..progress import progress as progress_bar
from ..report import table
from ..runtimes import CPU_RUNTIMES, get_runtime, installed
from . import machine
from .plots import bar_chart

PREFILL_COLUMNS = [("runtime", "runtime"), ("model", "model"), ("load s", "load_s"), ("median ms", "median_ms"),
           ("p90 ms", "p90_ms"), ("min ms", "min_ms"), ("CPU ms", "cpu_ms"), ("tokens/s", "tokens_per_s"),
           ("peak GiB", "peak_rss_gib"), ("x baseline", "speedup_vs_baseline"),
           ("x dense ORT", "speedup_vs_onnxruntime")]


def _stats(wall, cpu, tokens):
    wall, cpu = np.array(wall) * 1e3, np.array(cpu) * 1e3
    med = float(np.median(wall))
    return {"median_ms": med, "p90_ms": float(np.percentile(wall, 90)), "min_ms": float(wall.min()),
            "cpu_ms": float(np.median(cpu)), "tokens_per_s": tokens / med * 1e3}


def _timed(rt, ids, mask):
    w0, c0 = time.perf_counter(), time.process_time()
    out = rt.run(ids, mask)
    return out, time.perf_counter() - w0, time.process_time() - c0  # CPU: every thread of this process


def add_speedups(rows: list[dict], baseline: str | None = None) -> list[dict]:
    """Speedup of each row over the baseline model on the same runtime, and over dense ONNX Runtime.

    'Dense ONNX Runtime' is the baseline model on onnxruntime (the model itself without a baseline).
    """
    median = {(r["runtime"], r["model"]): r["median_ms"] for r in rows}
    ref = baseline or (rows[0]["model"] if rows else None)
    for r in rows:
        base = median.get((r["runtime"], baseline)) if baseline else None
        ort = median.get(("onnxruntime", ref))
        r["speedup_vs_baseline"] = base / r["median_ms"] if base else None
        r["speedup_vs_onnxruntime"] = ort / r["median_ms"] if ort else None
    return rows


def measure_runtime(folders: dict, runtime: str, batch: int, seqlen: int, warmup: int, iterations: int,
                    threads: int | None, logits: str, inputs, outputs=None) -> list[dict]:
    """Load every folder ({label: folder}) on one runtime, warm each up, then time them interleaved
    (each round runs every model once), so a shared machine's drift hits all models alike.

    inputs: .npz of ids, mask. outputs: a folder for each model's first output (<label>.npy).
    Peak memory per model: the interpreter's resident memory before any load plus what this model's
    load and warm-up added (the others stay loaded beside it). Returns one row per model.
    """
    saved = np.load(inputs)
    ids, mask = saved["ids"], saved["mask"]
    base, loaded, peaks = peak_rss_gib("VmRSS"), {}, {}
    try:
        for label, folder in folders.items():
            before, exact = peak_rss_gib("VmRSS"), reset_peak_rss()
            rt = loaded[label] = get_runtime(runtime)(folder, batch=batch, seqlen=seqlen, threads=threads,
                                                      logits=logits)
            first = _timed(rt, ids, mask)[0]
            for _ in range(warmup - 1):
                _timed(rt, ids, mask)
            peaks[label] = base + peak_rss_gib() - before if exact else peak_rss_gib()
            if outputs:
                np.save(Path(outputs) / f"{label}.npy", first)
        wall, cpu = {k: [] for k in folders}, {k: [] for k in folders}
        for _ in range(iterations):
            for label, rt in loaded.items():
                _, w, c = _timed(rt, ids, mask)
                wall[label].append(w)
                cpu[label].append(c)
        return [{"runtime": runtime, "version": rt.version, "model": label, "folder": str(folders[label]),
                 "logits": rt.logits, "load_s": rt.load_s, **_stats(wall[label], cpu[label], ids.size),
                 "peak_rss_gib": peaks[label], "peak_rss_scope": "interpreter + this model's load and warm-up"}
                for label, rt in loaded.items()]
    finally:
        for rt in loaded.values():
            rt.close()


def benchmark_prefill(folders: dict, runtimes=None, baseline: str | None = None, batch: int = 1, seqlen: int = 400,
                      warmup: int = 3, iterations: int = 20, threads: int | None = None, logits: str = "last",
                      inputs=None, keep_outputs: bool = False, progress: bool = True, on_crash: str = "raise",
                      log=print) -> dict:
    """Time every runtime on every model.

    folders:  {label: deployment or model folder}, in order; `baseline` names one of the labels.
    runtimes: runtime names (default: the installed CPU engines).
    inputs:   (input_ids, attention_mask) int64 [batch, seqlen]; default data.random_tokens().
    on_crash: "raise" (an engine crash is an error) or "record" (retry once with one thread, then record
    it under "crashes" and go on; see with_crash_policy).
    Returns {"config", "rows", "crashes", "trust", "versions"}; "trust" says how busy the machine was
    (machine.trust); with keep_outputs each row also holds "output" (the first output, numpy, not for JSON).
    """
    runtimes = list(runtimes or [n for n in CPU_RUNTIMES if installed(n)])
    for name in runtimes:
        get_runtime(name)  # unknown or missing: fail before any work
    for label, folder in folders.items():
        if not Path(folder).is_dir():
            raise UserError(f"folder not found: {folder}")
        models.resolve(folder)  # deployment and model folders both hold a config.json
    if baseline is not None and baseline not in folders:
        raise UserError(f"baseline '{baseline}' is not one of the models")
    if min(batch, seqlen, iterations) < 1 or warmup < 0:
        raise UserError("--batch, --seqlen and --iterations must be >= 1, --warmup >= 0")
    if inputs is None:
        vocab = models.read_config(next(iter(folders.values()))).get("vocab_size", 2)
        inputs = random_tokens(vocab, batch, seqlen)
    ids, mask = inputs
    if ids.shape != (batch, seqlen):
        raise UserError(f"inputs are {ids.shape}, expected ({batch}, {seqlen})")

    plan = {rt: dict(folders) for rt in runtimes}
    cpu_only = set(runtimes) <= set(CPU_RUNTIMES)
    if baseline is not None and cpu_only and "onnxruntime" not in runtimes and installed("onnxruntime"):
        plan["onnxruntime"] = {baseline: folders[baseline]}  # the dense ONNX Runtime reference
    rows, crashes = [], []
    bar = progress_bar(sum(len(v) for v in plan.values()), "benchmark", unit="model", enabled=progress)
    before = machine.snapshot()
    with tempfile.TemporaryDirectory(prefix="sparse-export-bench-") as scratch:
        np.savez(Path(scratch) / "inputs.npz", ids=ids, mask=mask)
        for name, group in plan.items():
            bar.set_description(f"{name}: {', '.join(group)}")
            out_dir = Path(scratch) / name
            out_dir.mkdir()
            args = dict(folders={k: str(v) for k, v in group.items()}, runtime=name, batch=batch, seqlen=seqlen,
                        warmup=warmup, iterations=iterations, threads=threads, logits=logits,
                        inputs=str(Path(scratch) / "inputs.npz"), outputs=str(out_dir) if keep_outputs else None)
            # DeepSparse in a fresh process: timings free of this one's state, crashes contained
            got = with_crash_policy(
                lambda a: isolate.call("sparse_export.measure.prefill:measure_runtime", a,
                                       f"DeepSparse running {', '.join(group)}", "try --threads 1, or another --runtime",
                                       child=name == "deepsparse"),
                args, name, list(group), on_crash, crashes, log)
            for row in got:
                if keep_outputs:
                    row["output"] = np.load(out_dir / f"{row['model']}.npy")
                if not progress:
                    log(f"{name}/{row['model']}: loaded in {row['load_s']:.1f}s, median {row['median_ms']:.2f} ms")
            rows += got
            bar.update(len(group))
            gc.collect()
    bar.close()
    trust = machine.trust(before, machine.snapshot(), rows)
    add_speedups(rows, baseline)
    config = {"batch": batch, "seqlen": seqlen, "warmup": warmup, "iterations": iterations,
              "threads": threads or "all", "logits": logits, "baseline": baseline,
              "models": {k: str(v) for k, v in folders.items()}, "cpu": cpu_name(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"config": config, "rows": rows, "crashes": crashes, "trust": trust, "versions": library_versions()}


def with_crash_policy(measure, args: dict, runtime: str, models_: list[str], on_crash: str, crashes: list,
                      log) -> list[dict]:
    """measure(args) -> rows. on_crash="raise": an engine crash is the caller's error. "record": retry once
    with one thread; if that crashes too, append what happened to `crashes` and return no rows. "retry":
    retry once with one thread; if that crashes too, that crash is the caller's error."""
    try:
        return measure(args)
    except EngineCrash as e:
        if on_crash not in ("record", "retry") or (on_crash == "retry" and args.get("threads") == 1):
            raise
        first = str(e)
    entry = {"runtime": runtime, "models": models_, "threads": args.get("threads") or "all", "error": first}
    if on_crash == "retry":
        log(f"warning: {first}; retrying {runtime} with one thread")
        try:
            rows = measure({**args, "threads": 1})
        except EngineCrash as e:
            raise EngineCrash(f"{e} (it crashed with {entry['threads']} threads, then again with one)") from None
        crashes.append({**entry, "retry": "passed with one thread: these rows are one-thread numbers"})
        for r in rows:
            r["threads"] = 1
            r["note"] = "rerun with one thread after a crash"
        return rows
    if args.get("threads") == 1:
        crashes.append({**entry, "retry": "none (it already ran on one thread)"})
        log(f"warning: {first}; recorded in the report, the other results are kept")
        return []
    log(f"warning: {first}; retrying {runtime} with one thread")
    try:
        rows = measure({**args, "threads": 1})
    except EngineCrash as e:
        crashes.append({**entry, "retry": f"crashed again with one thread: {e}"})
        log(f"warning: {runtime} crashed again with one thread; recorded in the report, the other results are kept")
        return []
    crashes.append({**entry, "retry": "passed with one thread: these rows are one-thread numbers"})
    for r in rows:
        r["threads"] = 1
        r["note"] = "rerun with one thread after a crash"
    return rows


def prefill_table(result: dict) -> str:
    return table(result["rows"], PREFILL_COLUMNS)


def plot_prefill(result: dict, path, title: str | None = None) -> str | Path:
    """Bar chart of median latency (whisker to p90) per runtime and model, PNG."""
    rows, c = result["rows"], result["config"]
    err = [[0] * len(rows), [r["p90_ms"] - r["median_ms"] for r in rows]]
    return bar_chart(rows, [r["median_ms"] for r in rows], err, "median latency, ms (whisker: p90)",
                     title or f"forward pass, {c['batch']}x{c['seqlen']} tokens, threads={c['threads']}", path)


def save_prefill(result: dict, json_path=None, plot_path=None) -> None:
    """Write the JSON (outputs left out) and the plot, where asked."""
    if json_path:
        rows = [{k: v for k, v in r.items() if k != "output"} for r in result["rows"]]
        write_json(json_path, {**result, "rows": rows})
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot_prefill(result, plot_path)
