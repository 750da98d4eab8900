"""Generation benchmark: time to first token and decode tokens/s of KV-cache deployment folders (DeepSparse,
ONNX Runtime), or of model folders on our own sparse-cpu runtimes."""

import statistics
import time
from pathlib import Path

import numpy as np

from .. import isolate, models
from ..errors import UserError
from ..outputs import Timer, cpu_name, library_versions, peak_rss_gib, read_meta, write_json
from ..progress import progress as progress_bar
from ..report import table
from ..runtimes import FOLDER_RUNTIMES, GENERATE_RUNTIMES, installed
from ..runtimes.generate import KVSession
from . import machine
from .plots import bar_chart
from .prefill import with_crash_policy

GENERATE_COLUMNS = [("runtime", "runtime"), ("model", "model"), ("sparsity", "sparsity"), ("load s", "load_s"),
           ("TTFT ms", "ttft_ms"), ("decode tok/s", "decode_tok_s"), ("ms/token", "decode_ms_median"),
           ("p90 ms/token", "decode_ms_p90"), ("CPU ms/token", "decode_cpu_ms_per_token"),
           ("peak GiB", "peak_rss_gib"), ("x baseline decode", "speedup_vs_baseline"),
           ("x baseline TTFT", "ttft_speedup_vs_baseline")]

CRASH_HINT = ("DeepSparse 1.8 does this on KV-cache graphs of some small models with more than one core; "
              "try --threads 1, or --runtime onnxruntime")


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: timing does not depend on the text."""
    return np.random.default_rng(seed).integers(10, vocab_size, n).tolist()


def measure_generation(folders: dict, runtime: str, prompt_tokens: int = 256, new_tokens: int = 128,
                       warmup: int = 1, iterations: int = 3, threads: int | None = None, sessions=None) -> list[dict]:
    """Time generation with every model of folders ({label: folder}) on one runtime, interleaved:
    each round generates once with each model, so the drift of a shared machine hits them alike.
    Returns one row per model."""
    sessions = dict(sessions or {})
    for label, folder in folders.items():
        s = sessions.get(label) or _session(folder, runtime, threads)
        if prompt_tokens + new_tokens - 1 > s.max_length:
            raise UserError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit {folder} "
                            f"(exported with --max-length {s.max_length})")
        if runtime == "deepsparse":  # compile both shapes before timing
            s.engine(prompt_tokens)
            s.engine(1)
        sessions[label] = s
    ids = {label: prompt_ids(_vocab_size(sessions[label], f), prompt_tokens) for label, f in folders.items()}
    for label in folders:
        for _ in range(warmup):
            _one(sessions[label], ids[label], min(new_tokens, 8))
    runs = {label: [] for label in folders}
    for _ in range(iterations):
        for label in folders:
            runs[label].append(_one(sessions[label], ids[label], new_tokens))
    return [_row(label, folders[label], runtime, sessions[label], runs[label], prompt_tokens, new_tokens,
                 iterations, threads) for label in folders]


def _vocab_size(session, folder) -> int:
    """The vocabulary of a loaded model (a sparse-cpu session also runs 'smollm2' or a .gguf file), else
    of the folder's config."""
    config = getattr(getattr(session, "model", None), "config", None)
    return config.vocab_size if config is not None else models.read_config(folder)["vocab_size"]


def measure_our_runtime(dense, pruned, prompt_tokens: int = 256, new_tokens: int = 128, warmup: int = 1,
                        iterations: int = 3, threads: int | None = None) -> list[dict]:
    """Our own runtimes beside each other: sparse-cpu-dense on the dense model (every matrix dense int8,
    rounded per row when it has no int8 grid) and sparse-cpu on the pruned folder, timed interleaved.
    Rows "dense" and "sparse"; speedups are over the dense row."""
    from ..runtimes.sparse_cpu.session import DecodeSession

    sessions = {"dense": DecodeSession(dense, "sparse-cpu-dense", threads),
                "sparse": DecodeSession(pruned, "sparse-cpu", threads)}
    rows = measure_generation({"dense": str(dense), "sparse": str(pruned)}, "sparse-cpu", prompt_tokens,
                              new_tokens, warmup, iterations, threads, sessions)
    base = rows[0]
    base["runtime"] = "sparse-cpu-dense"
    for r in rows:
        r["speedup_vs_baseline"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["ttft_speedup_vs_baseline"] = base["ttft_ms"] / r["ttft_ms"]
    return rows


def _session(folder, runtime, threads):
    if runtime in FOLDER_RUNTIMES:
        from ..runtimes.sparse_cpu.session import DecodeSession

        return DecodeSession(folder, runtime, threads)
    return KVSession(folder, runtime, threads)


def _row(label, folder, runtime, session, runs, prompt_tokens, new_tokens, iterations, threads):
    meta = read_meta(folder)
    steps = [s for r in runs for s in r["steps"]]
    step_ms = 1000 * statistics.median(steps)
    return {
        "model": label, "folder": str(folder), "runtime": runtime,
        "sparsity": meta.get("prunable_sparsity", meta.get("pruned_sparsity")), "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "max_length": session.max_length, "iterations": iterations,
        "threads": threads, "load_s": session.compile_s,
        "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in runs),
        "decode_tok_s": 1000 / step_ms,          # the same statistic as ms/token: they always agree
        "decode_ms_median": step_ms,
        "decode_ms_p90": 1000 * float(np.percentile(steps, 90)),
        "decode_ms_min": 1000 * min(steps),
        "decode_cpu_ms_per_token": 1000 * statistics.median(r["decode_cpu_s"] for r in runs) / (new_tokens - 1),
        "weight_bytes": getattr(session, "weight_bytes", None) or _weight_bytes(meta), "peak_rss_gib": peak_rss_gib(),
    }


def _one(session, ids, new_tokens):
    """One greedy generation of exactly new_tokens, timing each step."""
    t0 = time.perf_counter()
    logits, cache = session.run([ids], 0)
    ttft = time.perf_counter() - t0
    processed, steps = len(ids), []
    with Timer() as t:
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(logits[0, -1]))
            s = time.perf_counter()
            logits, cache = session.run([[tok]], processed, cache)
            steps.append(time.perf_counter() - s)
            processed += 1
    return {"ttft_s": ttft, "decode_s": t.wall, "decode_cpu_s": t.cpu, "steps": steps or [0.0]}


def _weight_bytes(meta):
    """Bytes of all weight initializers: dense fp32, and stored compressed (fp32 nonzeros + a bitmask)."""
    rows = meta.get("weights", {}).values()
    size = sum(int(np.prod(r["shape"])) for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {"dense_fp32": 4 * size, "compressed": 4 * (size - zeros) + size // 8}


def benchmark_generation(folders: dict, runtimes=None, baseline: str | None = None, prompt_tokens: int = 256,
                         new_tokens: int = 128, warmup: int = 1, iterations: int = 3, threads: int | None = None,
                         progress: bool = True, on_crash: str = "raise", log=print) -> dict:
    """Time generation of every model on every runtime; the models of one runtime are loaded together
    and timed interleaved (measure_generation), DeepSparse in a child process. on_crash: as in
    prefill.benchmark_prefill.

    folders: {label: KV-cache deployment folder, or model folder for FOLDER_RUNTIMES}; `baseline` names the
    dense one.
    runtimes: default the installed ones of deepsparse, onnxruntime (sparse-cpu when no folder has a graph).
    Returns {"config", "rows", "crashes", "trust", "versions"} like the prefill benchmark (measure/prefill.py).
    """
    import gc

    model_folders = not any((Path(f) / "model.onnx").is_file() for f in folders.values())
    runtimes = list(runtimes or (FOLDER_RUNTIMES[:1] if model_folders else [r for r in GENERATE_RUNTIMES if installed(r)]))
    if baseline is not None and baseline not in folders:
        raise UserError(f"baseline '{baseline}' is not one of the models")
    if min(prompt_tokens, new_tokens - 1, iterations) < 1 or warmup < 0:
        raise UserError("--prompt-tokens and --iterations must be >= 1, --new-tokens >= 2, --warmup >= 0")
    for rt in runtimes:
        if rt not in GENERATE_RUNTIMES + FOLDER_RUNTIMES:
            raise UserError(f"--mode generate runs on {', '.join(GENERATE_RUNTIMES + FOLDER_RUNTIMES)}, not '{rt}'")
    rows, crashes = [], []
    bar = progress_bar(len(runtimes), "generate benchmark", unit="runtime", enabled=progress)
    before = machine.snapshot()
    for rt in runtimes:
        args = dict(folders={k: str(v) for k, v in folders.items()}, runtime=rt, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, warmup=warmup, iterations=iterations, threads=threads)
        # a DeepSparse crash ends its child process, not this job
        rows += with_crash_policy(
            lambda a: isolate.call("sparse_export.measure.generation:measure_generation", a,
                                   f"DeepSparse generating with {', '.join(folders)}", CRASH_HINT,
                                   child=rt == "deepsparse"),
            args, rt, list(folders), on_crash, crashes, log)
        bar.update(1)
        gc.collect()
    bar.close()
    trust = machine.trust(before, machine.snapshot(), rows, spread_of=("decode_ms_p90", "decode_ms_min"))
    add_generation_speedups(rows, baseline)
    config = {"mode": "generate", "batch": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "warmup": warmup, "iterations": iterations, "threads": threads or "all", "baseline": baseline,
              "models": {k: str(v) for k, v in folders.items()}, "cpu": cpu_name(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"config": config, "rows": rows, "crashes": crashes, "trust": trust, "versions": library_versions()}


def add_generation_speedups(rows: list[dict], baseline: str | None) -> list[dict]:
    """Decode and time-to-first-token speedups over the baseline model on the same runtime."""
    base = {r["runtime"]: r for r in rows if r["model"] == baseline}
    for r in rows:
        b = base.get(r["runtime"])
        r["speedup_vs_baseline"] = r["decode_tok_s"] / b["decode_tok_s"] if b else None
        r["ttft_speedup_vs_baseline"] = b["ttft_ms"] / r["ttft_ms"] if b else None
    return rows


def generation_table(result: dict) -> str:
    return table(result["rows"], GENERATE_COLUMNS)


def plot_generation(result: dict, path, title: str | None = None) -> str | Path:
    """Bar chart of decode tokens/s per runtime and model (whisker: from the p90 step time), PNG."""
    rows, c = result["rows"], result["config"]
    err = [[max(r["decode_tok_s"] - 1000 / r["decode_ms_p90"], 0) for r in rows], [0] * len(rows)]
    return bar_chart(rows, [r["decode_tok_s"] for r in rows], err, "decode tokens/s (whisker: p90 step)",
                     title or f"generation, {c['prompt_tokens']}-token prompt + {c['new_tokens']} new, "
                          f"threads={c['threads']}", path)


def save_generation(result: dict, json_path=None, plot_path=None) -> None:
    if json_path:
        write_json(json_path, result)
    if plot_path:
        plot_generation(result, plot_path)


def run_cli(mode: str, folders: dict, runtimes: list[str] | None, prompt_tokens: int, new_tokens: int, warmup: int,
            iterations: int, threads: int | None, json_out, plot_out, on_crash: str = "retry", log=print) -> dict:
    """`benchmark --mode generate`: print the table, write JSON and plot where asked. A crashing engine is
    retried once on one thread (on_crash, as in prefill.with_crash_policy)."""
    if mode != "generate":
        raise UserError(f"unknown --mode '{mode}' (choose from prefill, generate)")
    result = benchmark_generation(folders, runtimes or None, "baseline" if "baseline" in folders else None, prompt_tokens,
                       new_tokens, warmup, iterations, threads, on_crash=on_crash, log=log)
    print(generation_table(result))
    save_generation(result, json_out, plot_out)
    return result


def profile_decode(folder, threads: int | None = None, iterations: int = 20) -> str:
    """DeepSparse's per-operator time breakdown of one decode step (text, from its debug analysis)."""
    import tempfile

    from ..export.kv_layout import KV_INPUTS, step_feed
    from ..runtimes.deepsparse_rt import layer_profile

    session = KVSession(folder, "deepsparse", threads)
    L = session.max_length
    feed = step_feed([[11]], L // 2, L)
    with tempfile.TemporaryDirectory() as tmp:
        path = session._fixed_shape_copy(1, Path(tmp))
        return layer_profile(path, [feed[k] for k in KV_INPUTS] + session.empty_cache(1), threads, iterations)
