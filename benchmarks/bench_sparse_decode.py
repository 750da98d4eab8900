"""Decode speed of our own sparse-cpu runtime (bitmask-packed int8 weights, AVX-512 VBMI2 + VNNI kernel)
against our dense int8 kernel, dense float32 torch, and optionally DeepSparse and llama.cpp.

Three commands; results go to benchmarks/results/sparse-decode-<name>.{json,md}:

  # 1. models: a dense int8 baseline and pruned int8 folders (SparseGPT --wbits 8 for SmolLM2; magnitude,
  #    rounded per row at load, for random-weight shapes whose weights mean nothing)
  python benchmarks/bench_sparse_decode.py prepare --model smollm2 --work /tmp/sd-smollm2
  python benchmarks/bench_sparse_decode.py prepare --model /tmp/tinyllama-random --work /tmp/sd-1b --method magnitude

  # 2. one Linear shape: kernel GB/s (weights read once per call, from DRAM: enough copies to
  #    overflow the caches) against this machine's streaming-read bandwidth
  python benchmarks/bench_sparse_decode.py micro --shape 4096x4096 --shape 14336x4096 --name micro
  python benchmarks/bench_sparse_decode.py micro --shape 4096x4096 --widths 8 4 --name micro-int4

  # 3. decode tokens/s at a 256-token context, 1 and 2 threads, every folder prepare wrote
  python benchmarks/bench_sparse_decode.py decode --work /tmp/sd-smollm2 --name smollm2 \
      [--deepsparse dense=DIR --deepsparse 50%=DIR ...] [--llama-python /work/venvs/llamacpp/bin/python]

`decode` rows: tokens/s (median step), ms/token split into time inside our kernel and the rest (Python,
attention, norms), weight bytes read per token, the kernel's effective bandwidth (weight bytes / kernel
time) and its share of the streaming-read bandwidth measured with the same threads, CPU time, peak RSS.
Sessions are loaded side by side (when their int8 weights fit in --max-resident-gib; else one at a time)
and timed interleaved: each round runs every model once per thread count.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparse_export import data, models
from sparse_export.measure import machine
from sparse_export.outputs import cpu_name, library_versions, peak_rss_gib, read_meta, write_json
from sparse_export.report import table
from sparse_export.runtimes.sparse_cpu import kernel as K
from sparse_export.runtimes.sparse_cpu.packed import pack, pack4
from sparse_export.runtimes.sparse_cpu.session import DecodeSession

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.5, 0.7, 0.8)
C4 = ("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
WIKI = ("wikitext2-raw", "wiki.test.raw")


# ---------------------------------------------------------------- prepare

def prepare(args):
    """Dense int8 baseline (sparsity 0) and one pruned folder per sparsity under --work."""
    from sparse_export.pruning import jobs
    from sparse_export.pruning.recipe import Recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = jobs.plain_copy(args.model, work / "source") if str(args.model) == "smollm2" else Path(args.model)
    calib = data.shared_asset(*C4)
    folders = {}
    for s in [0.0, *args.sparsities]:
        out = folders[_label(s)] = work / f"{args.method}-{int(round(s * 100))}"
        if s == 0 and args.method == "magnitude":  # nothing to prune or round: the source is the baseline
            folders["dense"] = source
            continue
        if out.exists():
            print(f"{out} exists, kept")
            continue
        if args.method == "sparsegpt":
            recipe = Recipe(sparsity=s, wbits=8, calib=str(calib), nsamples=args.nsamples, seqlen=args.seqlen)
        else:  # magnitude: no joint grid (the runtime rounds each row at load)
            recipe = Recipe(method="magnitude", sparsity=s)
        print(f"pruning {s:.0%} ({args.method}) -> {out}", flush=True)
        jobs.prune(source, out, recipe, log=lambda *a: None)
    (work / "models.json").write_text(json.dumps(
        {"source": str(args.model), "method": args.method, "folders": {k: str(v) for k, v in folders.items()}},
        indent=1))
    print(f"wrote {work / 'models.json'}")


def _label(s):
    return "dense" if s == 0 else f"{int(round(s * 100))}%"


# ---------------------------------------------------------------- streaming read

def stream_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best of `repeats` reads of a gib-GiB buffer with the kernel library's streaming loop, bytes/s."""
    buf = np.ones(int(gib * 2**30), np.uint8)
    K.stream_read(buf, threads)
    best = min(_timed(lambda: K.stream_read(buf, threads)) for _ in range(repeats))
    return buf.nbytes / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- micro

def micro(args):
    rng = np.random.default_rng(0)
    threads_list, rows = args.threads, []
    stream = {t: stream_bandwidth(t, args.stream_gib) for t in threads_list}
    before = machine.snapshot()
    for shape in args.shape:
        out, n_in = (int(v) for v in shape.lower().split("x"))
        base = rng.integers(-127, 128, (out, n_in), dtype=np.int8)
        base[base == 0] = 1
        base4 = rng.integers(-8, 8, (out, n_in), dtype=np.int8)
        base4[base4 == 0] = 1
        scale = np.full(out, 1e-3, np.float32)
        group = args.group_size if n_in % args.group_size == 0 else n_in     # else one scale per row
        gscale = np.full((out, n_in // group), 2.0 ** -10, np.float32)       # a float16 value
        for sparsity, width, dense in [(s, w, d) for s in [0.0, *args.sparsities] for w in args.widths
                                       for d in ([True, False] if s == 0 else [False])]:
            drop = np.random.default_rng(int(sparsity * 1000)).random((out, n_in)) < sparsity
            q = np.where(drop, 0, base if width == 8 else base4).astype(np.int8)
            packed = pack(q, scale, dense=dense) if width == 8 else pack4(q, gscale, dense=dense)
            nbytes = packed.nbytes()["read"]
            copies = max(2, -(-int(args.footprint_mib * 2**20) // nbytes))   # overflow the last-level cache
            layers = [K.KernelLayer(packed)] + [K.KernelLayer(_copy(packed)) for _ in range(copies - 1)]
            x = rng.standard_normal((args.batch, n_in)).astype(np.float32)
            for t in threads_list:
                times = _cycle(layers, x, t, args.calls)
                med = statistics.median(times)
                rows.append({"shape": f"{out}x{n_in}", "layout": ("dense" if dense else "bitmask") + f" int{width}",
                             "sparsity": sparsity, "batch": args.batch, "threads": t, "copies": copies,
                             "us_per_call": 1e6 * med, "p90_ms": 1e3 * float(np.percentile(times, 90)),
                             "min_ms": 1e3 * min(times), "bytes_read": nbytes, "gb_s": nbytes / med / 1e9,
                             "stream_gb_s": stream[t] / 1e9, "of_stream": nbytes / med / stream[t]})
            del layers
    for r in rows:  # speedup over the dense int8 kernel, same shape and threads
        base_row = next((b for b in rows if b["shape"] == r["shape"] and b["threads"] == r["threads"]
                         and b["layout"] == "dense int8"), None)
        r["x_dense_int8"] = base_row["us_per_call"] / r["us_per_call"] if base_row else None
    trust = machine.trust(before, machine.snapshot(), rows, spread_of=("p90_ms", "min_ms"))
    cols = [("shape", "shape"), ("layout", "layout"), ("sparsity", "sparsity"), ("threads", "threads"),
            ("us/call", "us_per_call"), ("MB read", "mb"), ("GB/s", "gb_s"), ("stream GB/s", "stream_gb_s"),
            ("of stream", "of_stream"), ("x dense int8", "x_dense_int8")]
    for r in rows:
        r["mb"] = r["bytes_read"] / 1e6
    _save(args.name, {"mode": "micro", "config": _config(args), "stream_bandwidth": stream, "rows": rows,
                      "trust": trust}, table(rows, cols), "one Linear, batch %d: kernel bandwidth" % args.batch)


def _copy(p):
    import copy

    c = copy.copy(p)
    for f in ("values", "mask", "offsets", "rowsum", "scale", "bias", "gscale"):
        if getattr(p, f) is not None:
            setattr(c, f, getattr(p, f).copy())
    return c


def _cycle(layers, x, threads, calls):
    for layer in layers:
        K.linear(layer, x, threads)
    times = []
    for i in range(calls):
        layer = layers[i % len(layers)]
        t = time.perf_counter()
        K.linear(layer, x, threads)
        times.append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------- decode

def _variants(folders: dict, fp32: bool) -> list[tuple[str, str, str]]:
    """(row label, runtime, folder): our dense int8 on the dense folder (and float32 torch), our bitmask
    runtime on each pruned folder."""
    out = []
    dense = folders.get("dense")
    if dense:
        if fp32:
            out.append(("dense fp32 torch", "torch-fp32", dense))
        out.append(("dense int8 (ours)", "sparse-cpu-dense", dense))
    out += [(f"{k} sparse int8 (ours)", "sparse-cpu", f) for k, f in folders.items() if k != "dense"]
    return out


def _params(folder) -> tuple[int, int]:
    """(decoder matrix weights, vocabulary x hidden) from the config (q/k/v/o as full h x h: an upper bound)."""
    cfg = models.read_config(folder)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    return layers * (4 * h * h + 3 * h * cfg["intermediate_size"]), cfg["vocab_size"] * h


def _fits_fp32(folder, budget_gib):
    decoder, vocab = _params(folder)
    return 4 * (decoder + 2 * vocab) / 2**30 < budget_gib


def _resident_gib(runtime, folder):
    """What a loaded session holds: float32 matrices for torch-fp32; else int8 matrices (nonzeros + a 1-bit
    mask for a sparse folder), an int8 head and the float32 embeddings."""
    decoder, vocab = _params(folder)
    if runtime == "torch-fp32":
        return 4 * (decoder + 2 * vocab) / 2**30
    s = read_meta(folder).get("pruned_sparsity") or 0.0
    per_weight = 1.0 if runtime == "sparse-cpu-dense" or s < 0.2 else 1 - s + 1 / 8
    return (decoder * per_weight + 5 * vocab) / 2**30


def decode(args):
    spec = json.loads((Path(args.work) / "models.json").read_text()) if args.work else {"folders": {}}
    folders = {**spec["folders"], **dict(m.split("=", 1) for m in args.model)}
    if not folders:
        sys.exit("no models: give --work (a prepare folder) or --model LABEL=DIR")
    fp32 = not args.no_fp32 and "dense" in folders and _fits_fp32(folders["dense"], args.max_resident_gib)
    variants = _variants(folders, fp32)
    stream = {t: stream_bandwidth(t, args.stream_gib) for t in args.threads}
    vocab = models.read_config(next(iter(folders.values())))["vocab_size"]
    prompt = np.random.default_rng(0).integers(10, vocab, args.prompt_tokens).tolist()
    together = sum(_resident_gib(r, f) for _, r, f in variants) < args.max_resident_gib
    groups = [variants] if together else [[v] for v in variants]
    rows, before = [], machine.snapshot()
    for group in groups:
        sessions = {}
        for label, runtime, folder in group:
            print(f"loading {label} ({runtime}) from {folder}", flush=True)
            sessions[label] = (DecodeSession(folder, runtime, threads=max(args.threads)), runtime, folder)
        runs = {(label, t): [] for label in sessions for t in args.threads}
        for label, (s, _, _) in sessions.items():           # warm-up: compile nothing, touch everything
            for t in args.threads:
                s.set_threads(t)
                _generate(s, prompt, 4)
        for _ in range(args.rounds):
            for t in args.threads:
                for label, (s, _, _) in sessions.items():
                    s.set_threads(t)
                    runs[label, t].append(_generate(s, prompt, args.new_tokens))
        for (label, t), r in runs.items():
            s, runtime, folder = sessions[label]
            rows.append(_decode_row(label, runtime, folder, s, t, r, stream[t], args))
        del sessions
    rows += _deepsparse_rows(args)
    rows += _llama_rows(args, folders.get("dense"), stream)
    _speedups(rows)
    if args.ppl_windows:
        _perplexity(rows, variants, args)
    trust = machine.trust(before, machine.snapshot(), rows, spread_of=("p90_ms", "min_ms"))
    cols = [("model", "label"), ("threads", "threads"), ("tok/s", "tok_s"), ("ms/token", "ms_token"),
            ("kernel ms", "kernel_ms"), ("other ms", "other_ms"), ("CPU ms/token", "cpu_ms_token"),
            ("weight MB/token", "weight_mb"), ("kernel GB/s", "kernel_gb_s"), ("of stream", "of_stream"),
            ("x dense int8", "x_dense_int8"), ("x fp32", "x_fp32"), ("peak GiB", "peak_rss_gib")]
    if args.ppl_windows:
        cols.append(("WikiText-2 ppl", "perplexity"))
    _save(args.name, {"mode": "decode", "config": {**_config(args), "folders": folders},
                      "stream_bandwidth": stream, "rows": rows, "trust": trust}, table(rows, cols),
          f"decode at a {args.prompt_tokens}-token context, batch 1, {args.new_tokens} new tokens per run")


def _generate(session, prompt, new_tokens):
    """Greedy generation; per decode step its wall time and the time inside our kernel."""
    t0 = time.perf_counter()
    logits, cache = session.run([prompt], 0)
    ttft, n, steps = time.perf_counter() - t0, len(prompt), []
    cpu0 = time.process_time()
    for _ in range(new_tokens - 1):
        tok = int(np.argmax(logits[0, -1]))
        with K.KernelClock() as clock:
            t = time.perf_counter()
            logits, cache = session.run([[tok]], n, cache)
            steps.append((time.perf_counter() - t, clock.seconds))
        n += 1
    return {"ttft": ttft, "steps": steps, "cpu": time.process_time() - cpu0}


def _decode_row(label, runtime, folder, session, threads, runs, stream, args):
    steps = [s for r in runs for s in r["steps"]]
    wall = statistics.median(s[0] for s in steps)
    kern = statistics.median(s[1] for s in steps)
    weight = session.weight_bytes["read"]
    cfg = session.model.config
    kv = 2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4 * (args.prompt_tokens + args.new_tokens // 2)
    return {"label": label, "runtime": runtime, "folder": str(folder), "threads": threads,
            "sparsity": read_meta(folder).get("pruned_sparsity"), "tok_s": 1 / wall, "ms_token": 1e3 * wall,
            "p90_ms": 1e3 * float(np.percentile([s[0] for s in steps], 90)), "min_ms": 1e3 * min(s[0] for s in steps),
            "kernel_ms": 1e3 * kern if runtime != "torch-fp32" else None,
            "other_ms": 1e3 * (wall - kern) if runtime != "torch-fp32" else None,
            "cpu_ms_token": 1e3 * statistics.median(r["cpu"] / len(r["steps"]) for r in runs),
            "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in runs),
            "weight_bytes": session.weight_bytes, "weight_mb": weight / 1e6, "kv_cache_mb_read": kv / 1e6,
            "kernel_gb_s": weight / kern / 1e9 if kern else None,
            "of_stream": weight / kern / stream if kern else None, "load_s": session.compile_s,
            "peak_rss_gib": peak_rss_gib(), "lean_loop": session.decoder is not None}


def _speedups(rows):
    for r in rows:
        same = [b for b in rows if b["threads"] == r["threads"]]
        d8 = next((b for b in same if b["label"] == "dense int8 (ours)"), None)
        f32 = next((b for b in same if b["label"] == "dense fp32 torch"), None)
        r["x_dense_int8"] = r["tok_s"] / d8["tok_s"] if d8 else None
        r["x_fp32"] = r["tok_s"] / f32["tok_s"] if f32 else None


def _perplexity(rows, variants, args):
    """WikiText-2 perplexity of each of our variants: the kernel model through transformers' forward."""
    from sparse_export.evaluate import perplexity

    wiki = data.shared_asset(*WIKI)
    ppl = {}
    for label, runtime, folder in variants:
        s = DecodeSession(folder, runtime, threads=max(args.threads), lean=False)
        windows = data.eval_windows(wiki, s.tokenizer, args.ppl_seqlen, args.ppl_windows)
        ppl[label] = perplexity(s.model, windows, progress=False)[0]
        del s
    for r in rows:
        r["perplexity"] = ppl.get(r["label"])


# ---------------------------------------------------------------- other engines

def _deepsparse_rows(args):
    """DeepSparse on KV-cache graphs (`export onnx --kv-cache`), through measure/generation.py."""
    if not args.deepsparse:
        return []
    from sparse_export.measure.generation import benchmark_generation

    folders = dict(m.split("=", 1) for m in args.deepsparse)
    rows = []
    for t in args.deepsparse_threads or args.threads:
        res = benchmark_generation(folders, ["deepsparse"], None, args.prompt_tokens, args.new_tokens, 1,
                                   args.rounds, t, progress=False, on_crash="record", log=print)
        for r in res["rows"]:
            rows.append({"label": f"{r['model']} DeepSparse", "runtime": "deepsparse", "folder": r["folder"],
                         "threads": t, "sparsity": r["sparsity"], "tok_s": r["decode_tok_s"],
                         "ms_token": r["decode_ms_median"], "p90_ms": r["decode_ms_p90"], "min_ms": r["decode_ms_min"],
                         "cpu_ms_token": r["decode_cpu_ms_per_token"], "ttft_ms": r["ttft_ms"],
                         "weight_mb": r["weight_bytes"]["compressed"] / 1e6, "peak_rss_gib": r["peak_rss_gib"]})
        for c in res["crashes"]:
            print(f"DeepSparse crashed ({t} threads): {c}")
    return rows


def _llama_rows(args, dense_folder, stream):
    """llama.cpp (llama-cpp-python in its own venv) on GGUF files of the dense model: Q8_0 and Q4_0."""
    if not args.llama_python:
        return []
    if not Path(args.llama_python).is_file():
        print(f"no llama.cpp: {args.llama_python} not found")
        return []
    import llamacpp_gguf

    work = Path(args.work or args.gguf_dir)
    paths = {q: work / f"llamacpp-{q.lower()}.gguf" for q in args.llama_types}
    if not all(p.exists() for p in paths.values()):
        f16 = llamacpp_gguf.write_gguf(dense_folder, work / "llamacpp-f16.gguf")
        for qtype, path in paths.items():
            llamacpp_gguf.quantize(args.llama_python, f16, path, qtype)
        f16.unlink()   # an intermediate: 2 bytes per weight on disk
    rows = []
    for qtype, path in paths.items():
        nbytes = llamacpp_gguf.read_bytes_per_token(path)
        for t in args.threads:
            r = llamacpp_gguf.decode(args.llama_python, path, t, args.prompt_tokens, args.new_tokens, args.rounds)
            rows.append({"label": f"dense llama.cpp {qtype}", "runtime": "llama.cpp", "folder": str(path),
                         "threads": t, "sparsity": 0.0, "tok_s": 1e3 / r["ms_token"], **r,
                         "weight_mb": nbytes / 1e6, "kernel_gb_s": None,
                         "of_stream": nbytes / (r["ms_token"] / 1e3) / stream[t]})
    return rows


# ---------------------------------------------------------------- output

def _config(args):
    return {**{k: v for k, v in vars(args).items() if k != "func"}, "cpu": cpu_name(),
            "avx512_vbmi2_vnni": K.has_avx512(), "kernel_path": K.resolve_path(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(),
            "load1_at_start": os.getloadavg()[0]}


def _save(name, result, text, title):
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"sparse-decode-{name}.json", result)
    trust = result.get("trust") or {}
    notes = "\n".join(f"- {w}" for w in trust.get("warnings", []))
    stream = ", ".join(f"{t} thread{'s' if int(t) > 1 else ''}: {b / 1e9:.1f} GB/s"
                       for t, b in result["stream_bandwidth"].items())
    md = (f"# sparse-cpu: {title}\n\n{result['config']['cpu']}; streaming read ({stream}).\n"
          f"Command: `python benchmarks/bench_sparse_decode.py {' '.join(sys.argv[1:])}`\n\n{text}\n"
          + (f"\nTiming warnings:\n{notes}\n" if notes else ""))
    (RESULTS / f"sparse-decode-{name}.md").write_text(md)
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("prepare", help="prune the dense int8 baseline and the sparse folders")
    p.add_argument("--model", required=True, help="smollm2, or a model folder")
    p.add_argument("--work", required=True)
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "magnitude"])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.set_defaults(func=prepare)
    p = sub.add_parser("micro", help="kernel bandwidth of single Linear shapes")
    p.add_argument("--shape", action="append", required=True, help="OUTxIN, e.g. 4096x4096 (repeatable)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--footprint-mib", type=float, default=256, help="copies of each layer total at least this")
    p.add_argument("--stream-gib", type=float, default=1.0)
    p.add_argument("--widths", type=int, nargs="+", default=[8], choices=[8, 4],
                   help="weight widths: 8 (int8, per-row scales) and/or 4 (int4, group scales)")
    p.add_argument("--group-size", type=int, default=128, help="int4 columns per scale (per row when it "
                                                                 "does not divide the width)")
    p.add_argument("--name", default="micro")
    p.set_defaults(func=micro)
    p = sub.add_parser("decode", help="decode tokens/s of whole models")
    p.add_argument("--work", help="a folder written by `prepare` (its models.json)")
    p.add_argument("--model", action="append", default=[], help="LABEL=DIR (repeatable; 'dense' is the baseline)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 torch row")
    p.add_argument("--max-resident-gib", type=float, default=8.0,
                   help="load models side by side when their loaded weights total less (else one at a time); "
                        "the fp32 row only when its weights fit")
    p.add_argument("--stream-gib", type=float, default=1.0)
    p.add_argument("--ppl-windows", type=int, default=0, help="WikiText-2 perplexity over this many windows")
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--deepsparse", action="append", default=[], help="LABEL=KV-cache deployment folder")
    p.add_argument("--deepsparse-threads", type=int, nargs="+",
                   help="thread counts for the DeepSparse rows (default: --threads; each compiles every graph again)")
    p.add_argument("--llama-python", help="python of a venv with llama-cpp-python (rows for Q8_0 and Q4_0)")
    p.add_argument("--llama-types", nargs="+", default=["Q8_0", "Q4_0"])
    p.add_argument("--gguf-dir", default="/tmp", help="where GGUF files go without --work")
    p.add_argument("--name", default="decode")
    p.set_defaults(func=decode)
    args = ap.parse_args()
    torch.set_num_threads(max(getattr(args, "threads", [1])))
    args.func(args)


if __name__ == "__main__":
    main()
