"""End-to-end latency of one forward pass over batch x seqlen tokens, per runtime and model.

Each (runtime, model) pair is loaded alone, warmed up, timed, and freed before the next, so
engines never compete for the cores. Speedups compare medians measured in the same run.
"""

import gc
import os
import re
import time
from pathlib import Path

import numpy as np

from . import models
from .errors import UserError
from .outputs import library_versions, peak_rss_gib, write_json

CPU_RUNTIMES = ("deepsparse", "onnxruntime", "torch")
COLUMNS = [("runtime", "runtime"), ("model", "model"), ("load s", "load_s"), ("median ms", "median_ms"),
           ("p90 ms", "p90_ms"), ("min ms", "min_ms"), ("CPU ms", "cpu_ms"), ("tokens/s", "tokens_per_s"),
           ("peak GiB", "peak_rss_gib"), ("x baseline", "speedup_vs_baseline"),
           ("x dense ORT", "speedup_vs_onnxruntime")]


def _reset_peak_rss():
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_inputs(vocab_size, batch, seqlen, seed=0):
    """Token ids drawn uniformly (latency does not depend on which tokens), mask of ones."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seqlen), dtype=np.int64)
    return ids, np.ones_like(ids)


def time_runs(rt, ids, mask, warmup, iterations, bar=None):
    """Warm up, then time `iterations` runs. Returns stats (ms) and the first output."""
    first, wall, cpu = None, [], []
    for i in range(warmup + iterations):
        w0, c0 = time.perf_counter(), time.process_time()
        out = rt.run(ids, mask)
        if i >= warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)  # every thread of this process, engines included
        first = out if first is None else first
        if bar is not None:
            bar.update(1)
    wall, cpu = np.array(wall) * 1e3, np.array(cpu) * 1e3
    med = float(np.median(wall))
    return {"median_ms": med, "p90_ms": float(np.percentile(wall, 90)), "min_ms": float(wall.min()),
            "cpu_ms": float(np.median(cpu)), "tokens_per_s": ids.size / med * 1e3}, first


def add_speedups(rows, baseline=None):
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


def benchmark(folders, runtimes=None, baseline=None, batch=1, seqlen=400, warmup=3, iterations=20,
              threads=None, logits="last", inputs=None, keep_outputs=False, progress=True, log=print):
    """Time every runtime on every model.

    folders:  {label: deployment or model folder}, in order; `baseline` names one of the labels.
    runtimes: runtime names (default: the installed CPU engines).
    inputs:   (input_ids, attention_mask) int64 [batch, seqlen]; default random_inputs().
    Returns {"config", "rows", "versions"}; with keep_outputs each row also holds "output"
    (the first output, numpy, not for JSON).
    """
    from tqdm import tqdm

    from .runtimes import get_runtime, installed

    runtimes = list(runtimes or [n for n in CPU_RUNTIMES if installed(n)])
    classes = {name: get_runtime(name) for name in runtimes}  # unknown or missing: fail before any work
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
        inputs = random_inputs(vocab, batch, seqlen)
    ids, mask = inputs
    if ids.shape != (batch, seqlen):
        raise UserError(f"inputs are {ids.shape}, expected ({batch}, {seqlen})")

    plan = [(rt, label) for rt in runtimes for label in folders]
    cpu_only = set(runtimes) <= set(CPU_RUNTIMES)
    if baseline is not None and cpu_only and "onnxruntime" not in runtimes and installed("onnxruntime"):
        classes["onnxruntime"] = get_runtime("onnxruntime")  # the dense ONNX Runtime reference
        plan.append(("onnxruntime", baseline))
    rows = []
    bar = tqdm(total=len(plan) * (warmup + iterations), desc="benchmark", unit="run", disable=not progress)
    for name, label in plan:
        bar.set_description(f"loading {name}/{label}")
        exact_peak = _reset_peak_rss()
        rt = classes[name](folders[label], batch=batch, seqlen=seqlen, threads=threads, logits=logits)
        bar.set_description(f"{name}/{label}")
        stats, out = time_runs(rt, ids, mask, warmup, iterations, bar)
        row = {"runtime": name, "version": rt.version, "model": label, "folder": str(folders[label]),
               "logits": rt.logits, "load_s": rt.load_s, **stats,
               "peak_rss_gib": peak_rss_gib(), "peak_rss_scope": "this load+run" if exact_peak else "process"}
        if keep_outputs:
            row["output"] = out
        rows.append(row)
        if not progress:
            log(f"{name}/{label}: loaded in {rt.load_s:.1f}s, median {stats['median_ms']:.2f} ms")
        rt.close()
        del rt
        gc.collect()
    bar.close()
    add_speedups(rows, baseline)
    config = {"batch": batch, "seqlen": seqlen, "warmup": warmup, "iterations": iterations,
              "threads": threads or "all", "logits": logits, "baseline": baseline,
              "models": {k: str(v) for k, v in folders.items()}, "cpu": _cpu_name(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"config": config, "rows": rows, "versions": library_versions()}


def _cpu_name():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"model name\s*:\s*(.+)", text)
    return f"{m.group(1).strip() if m else 'unknown'} ({os.cpu_count()} logical cores)"


def table(result):
    from .jobs import format_table

    return format_table(result["rows"], COLUMNS)


def bar_chart(rows, values, err, ylabel, title, path):
    """PNG bar chart, one bar per row (runtime/model), coloured by runtime, annotated with speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['runtime']}\n{r['model']}" for r in rows]
    colors = {rt: f"C{i}" for i, rt in enumerate(dict.fromkeys(r["runtime"] for r in rows))}
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    bars = ax.bar(range(len(rows)), values, yerr=err, capsize=3, color=[colors[r["runtime"]] for r in rows])
    for b, r in zip(bars, rows):
        if r.get("speedup_vs_baseline"):
            ax.annotate(f"{r['speedup_vs_baseline']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(result, path, title=None):
    """Bar chart of median latency (whisker to p90) per runtime and model, PNG."""
    rows, c = result["rows"], result["config"]
    err = [[0] * len(rows), [r["p90_ms"] - r["median_ms"] for r in rows]]
    return bar_chart(rows, [r["median_ms"] for r in rows], err, "median latency, ms (whisker: p90)",
                     title or f"forward pass, {c['batch']}x{c['seqlen']} tokens, threads={c['threads']}", path)


def save(result, json_path=None, plot_path=None):
    """Write the JSON (outputs left out) and the plot, where asked."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in r.items() if k != "output"} for r in result["rows"]]
        write_json(json_path, {**result, "rows": rows})
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(result, plot_path)
