"""Load benchmark of `sparse-export serve` (continuous batching on sparse-cpu) against llama.cpp's own
`llama-server` (-np slots, continuous batching) on Q8_0 / Q4_0 / Q4_K_M GGUFs of the same model.

Clients on 127.0.0.1 only stream /v1/completions requests (prompt_tokens random token ids, new_tokens
generated with ignore_eos, greedy) at concurrency 1, 2, 4, 8, 16; per engine and level: aggregate tok/s,
time to first token and inter-token latency p50/p99, errors, the server's peak RSS (psutil on its pid and
children, sampled every 50 ms). Every level starts a fresh server with as many slots as clients.

  # the model folders: bench_sparse_decode.py prepare (dense int8 and 70% int8), or make_random_model.py + prune
  python benchmarks/bench_serve.py load --name tinyllama-1.1b --model dense=/w/dense --model s70=/w/s70 \
      --llama-server /path/llama.cpp/build/bin/llama-server --gguf-from /w/dense
  python benchmarks/bench_serve.py soak --model /w/s70 --requests 1000 --concurrency 16 --kv-budget 1
  # the batched decode step itself, no HTTP: batch 1 and 8 over caches of 320 tokens, split into the int8
  # matmuls, the rest of the native step (attention, norms, rotary) and Python
  python benchmarks/bench_serve.py step --name tinyllama-1.1b --model dense=/w/dense --model s70=/w/s70
  python benchmarks/bench_serve.py load --name smoke --model dense=/w/tiny --levels 1,2 --requests 4 \
      --prompt-tokens 16 --new-tokens 8 --no-single-stream --out /tmp/smoke      # a smoke run

Results: benchmarks/results/serve-<name>.{json,md,png} (soak: serve-soak-<name>.*, step: serve-step-<name>.*). The single-stream row
compares the server at concurrency 1 with `sparse-export benchmark --mode generate` on the same folder.
Run it on a quiet machine: the numbers are wall-clock rates.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    """Peak RSS (bytes) of a process and its children, sampled every `every` seconds; samples kept."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.every, self.peak, self.samples = psutil.Process(pid), every, 0, []
        self.done = threading.Event()

    def rss(self) -> int:
        import psutil

        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def run(self):
        t0 = time.monotonic()
        while not self.done.is_set():
            r = self.rss()
            self.peak = max(self.peak, r)
            self.samples.append((time.monotonic() - t0, r))
            self.done.wait(self.every)


class Server:
    """A server subprocess on a free 127.0.0.1 port, ready when /health answers 200; always stopped."""

    def __init__(self, argv_of_port, label: str, env=None, ready_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.label = label
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv_of_port(self.port), stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        import httpx

        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{label} exited while starting (code {self.proc.returncode}):\n"
                                 f"{self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{label} did not start in {ready_s:.0f} s")
            time.sleep(0.3)
        self.rss = RssSampler(self.proc.pid)
        self.rss.start()

    def stop(self) -> int:
        if hasattr(self, "rss"):
            self.rss.done.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def ours(folder, slots, runtime, threads, context, kv_budget=None):
    def argv(port):
        a = [sys.executable, "-m", "sparse_export.cli.main", "serve", str(folder), "--port", str(port),
             "--max-batch", str(slots), "--runtime", runtime, "--max-context", str(context), "--name", "model",
             "--max-queue", "4096", "--log-level", "warning"]
        return a + (["--threads", str(threads)] if threads else []) + (["--kv-budget", str(kv_budget)] if kv_budget else [])
    return argv


def llama(binary, gguf, slots, threads, context):
    def argv(port):
        a = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
             "-c", str(context * slots), "--cont-batching", "--no-webui"]
        # llama.cpp's default -t is the physical core count (1 on this 2-vCPU machine); ours uses every
        # logical core: give both the same
        t = threads or os.cpu_count()
        return a + ["-t", str(t), "-tb", str(t)]
    return argv


# ---- load

async def _one(client, url, prompt, new_tokens, out):
    body = {"model": "model", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                out.append({"error": f"HTTP {r.status_code}: {r.text[:200]}"})
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    out.append({"error": str(d["error"])[:200]})
                    return
                if d.get("usage"):
                    usage = d["usage"]
                if d.get("choices") and d["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 (counted as an error of this request)
        out.append({"error": f"{type(e).__name__}: {e}"[:200]})
        return
    tokens = (usage or {}).get("completion_tokens") or len(stamps)
    if not stamps:
        out.append({"error": "no tokens"})
        return
    out.append({"ttft": stamps[0] - t0, "gaps": list(np.diff(stamps)), "tokens": tokens, "end": stamps[-1],
                "start": t0})


async def _load(url, prompts, concurrency, new_tokens, timeout):
    import httpx

    out, todo = [], list(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker():
            while todo:
                await _one(client, url, todo.pop(), new_tokens, out)
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(concurrency)]), timeout)
        wall = time.perf_counter() - t0
    return out, wall


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def level_row(engine, model, concurrency, results, wall, rss_peak):
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"engine": engine, "model": model, "concurrency": concurrency, "requests": len(results),
            "errors": len(errors), "error_examples": errors[:3], "tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall if wall else None,
            "ttft_ms_p50": 1000 * pct(ttft, 50) if ttft else None, "ttft_ms_p99": 1000 * pct(ttft, 99) if ttft else None,
            "itl_ms_p50": 1000 * pct(gaps, 50) if gaps else None, "itl_ms_p99": 1000 * pct(gaps, 99) if gaps else None,
            "decode_tok_s_per_stream": 1 / statistics.median(gaps) if gaps else None,
            "peak_rss_gib": rss_peak / 2**30}


def prompts_for(vocab, n, tokens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, min(vocab, 32000), tokens).tolist() for _ in range(n)]


def run_level(make_server, engine, model, concurrency, args, vocab):
    try:
        server = Server(make_server(concurrency), f"{engine} {model}")
    except SystemExit as e:   # a server that does not start is a row with its error, not the end of the run
        print(f"{engine} {model} c={concurrency}: {str(e).splitlines()[0]}", flush=True)
        return {**level_row(engine, model, concurrency, [{"error": str(e)[-500:]}], 0, 0), "requests": 0}
    try:
        warm = prompts_for(vocab, min(concurrency, 2), args.prompt_tokens, seed=99)
        asyncio.run(_load(server.url, warm, len(warm), 4, args.timeout))            # untimed warm-up
        n = max(args.requests, concurrency) if args.requests else max(2 * concurrency, 4)
        results, wall = asyncio.run(_load(server.url, prompts_for(vocab, n, args.prompt_tokens), concurrency,
                                          args.new_tokens, args.timeout))
        row = level_row(engine, model, concurrency, results, wall, server.rss.peak)
        if engine.startswith("sparse-export"):
            row["split_s"] = scheduler_split(server.url)
    finally:
        server.stop()
    print(f"{engine:>28} {model:>10} c={concurrency:<3} {row['aggregate_tok_s'] or 0:8.1f} tok/s  "
          f"TTFT p50 {row['ttft_ms_p50'] or 0:7.1f} ms  ITL p50 {row['itl_ms_p50'] or 0:6.1f} ms  "
          f"errors {row['errors']}  RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return row


def scheduler_split(url) -> dict:
    """Seconds of our scheduler thread by part (its /metrics): step_matmul (int8 matmuls in the native step),
    step_other (attention, norms, the call around it), prefill, scheduler (sampling, text, admission). The
    rest of the wall time is HTTP and waiting."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("sparse_export_scheduler_seconds_total{"):
            part = line.split('part="', 1)[1].split('"', 1)[0]
            out[part] = float(line.rsplit(" ", 1)[1])
    return out


def single_stream(folder, runtime, args) -> dict:
    """`sparse-export benchmark --mode generate` on the folder (the batch-1 decode rate of the same runtime)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "g.json"
        cmd = [sys.executable, "-m", "sparse_export.cli.main", "benchmark", str(folder), "--mode", "generate",
               "--runtime", runtime, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--warmup", "1", "--iterations", "3", "--json", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
        row = json.loads(out.read_text())["rows"][0]
    return {"decode_tok_s": row["decode_tok_s"], "ttft_ms": row["ttft_ms"]}


def ggufs(source, types, work, llama_bin) -> dict:
    """{type: path}: an F16 GGUF of the folder (llamacpp_gguf.write_gguf), quantized by llama-quantize."""
    from llamacpp_gguf import write_gguf   # beside this script

    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        write_gguf(source, f16)
    quant = Path(llama_bin).parent / "llama-quantize"
    out = {}
    for t in types:
        path = work / f"model-{t}.gguf"
        if not path.exists():
            subprocess.run([str(quant), str(f16), str(path) + ".tmp", t], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            Path(str(path) + ".tmp").rename(path)
        out[t] = path
    return out


# ---- results

COLUMNS = [("engine", "engine"), ("model", "model"), ("clients", "concurrency"), ("tok/s", "aggregate_tok_s"),
           ("TTFT p50 ms", "ttft_ms_p50"), ("TTFT p99 ms", "ttft_ms_p99"), ("ITL p50 ms", "itl_ms_p50"),
           ("ITL p99 ms", "itl_ms_p99"), ("errors", "errors"), ("peak RSS GiB", "peak_rss_gib")]


def save(name, result, title, out_dir: Path):
    from sparse_export.outputs import write_json
    from sparse_export.report import table

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result)
    md = [f"# {title}", "", f"{result['config']['cpu']}; {json.dumps({k: v for k, v in result['config'].items() if k != 'cpu'})}",
          "", table(result["rows"], COLUMNS), ""]
    for k, v in result.get("summary", {}).items():
        md.append(f"- {k}: {v}")
    split = [r for r in result["rows"] if r.get("split_s")]
    if split:
        md += ["", "Scheduler time by part, seconds (from its /metrics, warm-up included; the rest of the wall "
               "time is HTTP and waiting):", "",
               "| engine | model | clients | wall s | int8 matmuls | rest of step | prefill | scheduler |",
               "|---|---|---|---|---|---|---|---|"]
        for r in split:
            p = r["split_s"]
            md.append(f"| {r['engine']} | {r['model']} | {r['concurrency']} | {r['wall_s']:.2f} | "
                      + " | ".join(f"{p.get(k, 0):.2f}" for k in ("step_matmul", "step_other", "prefill", "scheduler"))
                      + " |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    rows = result["rows"]
    if rows and "concurrency" in rows[0]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in dict.fromkeys((r["engine"], r["model"]) for r in rows):
            rs = [r for r in rows if (r["engine"], r["model"]) == key and r["aggregate_tok_s"]]
            ax.plot([r["concurrency"] for r in rs], [r["aggregate_tok_s"] for r in rs], marker="o",
                    label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=120)
        plt.close(fig)


def summarize(rows, single) -> dict:
    out = {}
    for (engine, model) in dict.fromkeys((r["engine"], r["model"]) for r in rows):
        by = {r["concurrency"]: r for r in rows if (r["engine"], r["model"]) == (engine, model)}
        if 1 in by and 8 in by and by[1]["decode_tok_s_per_stream"] and by[8]["aggregate_tok_s"]:
            out[f"{engine} {model}: aggregate tok/s at 8 / single-stream decode tok/s"] = round(
                by[8]["aggregate_tok_s"] / by[1]["decode_tok_s_per_stream"], 2)
        if 1 in by and 8 in by and by[1]["itl_ms_p50"] and by[8]["itl_ms_p50"]:   # decode steps alone
            out[f"{engine} {model}: 8 streams' decode rate / one stream's (8 x ITL p50 at 1 / ITL p50 at 8)"] = round(
                8 * by[1]["itl_ms_p50"] / by[8]["itl_ms_p50"], 2)
    for model, s in single.items():
        r1 = next((r for r in rows if r["model"] == model and r["concurrency"] == 1 and r["engine"].startswith("sparse")), None)
        if r1 and r1["decode_tok_s_per_stream"]:
            out[f"{model}: server single stream / benchmark --mode generate (decode tok/s)"] = round(
                r1["decode_tok_s_per_stream"] / s["decode_tok_s"], 3)
    return out


def load_cmd(args):
    from sparse_export import models
    from sparse_export.outputs import cpu_name, library_versions

    folders = dict(m.split("=", 1) for m in args.model)
    vocab = models.read_config(next(iter(folders.values())))["vocab_size"]
    levels = [int(x) for x in args.levels.split(",")]
    context = args.prompt_tokens + args.new_tokens + 8
    rows, single = [], {}
    if args.llama_only:        # keep our rows of an earlier run of the same --name, time llama-server again
        earlier = json.loads((Path(args.out) / f"serve-{args.name}.json").read_text())
        rows = [r for r in earlier["rows"] if r["engine"] != "llama-server"]
        single = earlier.get("single_stream", {})
    llama_rows = []
    if args.keep_llama:        # the other way round: time ours again, keep llama-server's rows
        earlier = json.loads((Path(args.out) / f"serve-{args.name}.json").read_text())
        llama_rows = [r for r in earlier["rows"] if r["engine"] == "llama-server"]
    for model, folder in ([] if args.llama_only else folders.items()):
        runtime = "sparse-cpu-dense" if model == "dense" else "sparse-cpu"
        for c in levels:
            rows.append(run_level(lambda s, f=folder, r=runtime: ours(f, s, r, args.threads, context),
                                  f"sparse-export serve ({runtime})", model, c, args, vocab))
        if not args.no_single_stream:
            single[model] = single_stream(folder, runtime, args)
    if args.llama_server:
        source = args.gguf_from or next(iter(folders.values()))
        for t, path in ggufs(source, args.gguf_types.split(","), Path(args.work) / "gguf", args.llama_server).items():
            for c in levels:
                rows.append(run_level(lambda s, p=path: llama(args.llama_server, p, s, args.threads, context),
                                      "llama-server", t, c, args, vocab))
    rows += llama_rows
    config = {"name": args.name, "models": folders, "levels": levels, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "requests_per_level": args.requests or "2 x clients", "threads":
              args.threads or "all", "cpu": cpu_name(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result = {"config": config, "rows": rows, "single_stream": single, "summary": summarize(rows, single),
              "versions": library_versions()}
    save(f"serve-{args.name}", result, f"serve load: {args.name}, {args.prompt_tokens}-token prompts + "
         f"{args.new_tokens} new", Path(args.out))
    for k, v in result["summary"].items():
        print(f"{k}: {v}")


def soak_cmd(args):
    """`requests` requests at `concurrency` against one server: errors, and RSS over time against the budget."""
    from sparse_export import models
    from sparse_export.outputs import cpu_name, library_versions

    vocab = models.read_config(args.model)["vocab_size"]
    context = args.prompt_tokens + args.new_tokens + 8
    server = Server(ours(args.model, args.concurrency, "sparse-cpu", args.threads, context, args.kv_budget), "serve")
    try:
        warm = prompts_for(vocab, 2 * args.concurrency, args.prompt_tokens, seed=99)
        asyncio.run(_load(server.url, warm, args.concurrency, args.new_tokens, args.timeout))
        base = server.rss.rss()
        results, wall = asyncio.run(_load(server.url, prompts_for(vocab, args.requests, args.prompt_tokens),
                                          args.concurrency, args.new_tokens, args.timeout * 20))
        row = level_row("sparse-export serve", Path(args.model).name, args.concurrency, results, wall, server.rss.peak)
        samples = list(server.rss.samples)
        code = server.stop()
    finally:
        server.stop()
    budget = (args.kv_budget or 0) * 2**30
    growth = row["peak_rss_gib"] * 2**30 - base
    row.update(rss_after_warmup_gib=base / 2**30, rss_growth_gib=growth / 2**30, exit_code=code)
    summary = {"errors": row["errors"], "RSS growth after warm-up (GiB)": round(growth / 2**30, 3),
               "KV budget (GiB)": args.kv_budget, "growth within the budget": (growth <= budget) if budget else None}
    config = {"name": args.name, "model": str(args.model), "requests": args.requests, "concurrency": args.concurrency,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "kv_budget_gib": args.kv_budget,
              "cpu": cpu_name(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result = {"config": config, "rows": [row], "rss_samples": samples[:: max(1, len(samples) // 2000)],
              "summary": summary, "versions": library_versions()}
    save(f"serve-soak-{args.name}", result, f"serve soak: {args.requests} requests at concurrency {args.concurrency}",
         Path(args.out))
    print(json.dumps(summary))


def step_cmd(args):
    """The batched decode step alone: BatchSession's native call at each batch size over caches holding
    --cache-tokens random keys and values (what attention costs does not depend on their values)."""
    import torch

    from sparse_export.outputs import cpu_name, library_versions, write_json
    from sparse_export.runtimes.sparse_cpu import decoder as dec
    from sparse_export.runtimes.sparse_cpu.kernel import KernelClock
    from sparse_export.runtimes.sparse_cpu.session import DecodeSession

    native = [0.0]
    call = dec.decode_batch

    def timed(*a, **k):               # the native call's wall time (the rest of step_batch is Python)
        t = time.perf_counter()
        out = call(*a, **k)
        native[0] += time.perf_counter() - t
        return out

    dec.decode_batch = timed
    batches = [int(b) for b in args.batches.split(",")]
    L, rows = args.cache_tokens, []
    for label, folder in (m.split("=", 1) for m in args.model):
        runtime = "sparse-cpu-dense" if label == "dense" else "sparse-cpu"
        session = DecodeSession(folder, runtime, threads=args.threads)
        d = session.decoder
        gen = torch.Generator().manual_seed(0)
        caches = []
        for _ in range(max(batches)):
            c = dec.LeanCache(len(d.layers), d.KV, d.D, capacity=L + 8)
            c.k = [torch.randn(1, d.KV, L + 8, d.D, generator=gen) for _ in d.layers]
            c.v = [torch.randn(1, d.KV, L + 8, d.D, generator=gen) for _ in d.layers]
            c.length = L
            caches.append(c)
        times = {b: [] for b in batches}
        torch.set_num_threads(1)
        with torch.inference_mode():
            for rep in range(args.repetitions + 1):         # batch sizes interleaved; the first round warms up
                for b in batches:
                    native[0] = 0.0
                    t = time.perf_counter()
                    with KernelClock() as k:
                        for _ in range(args.steps):
                            d.step_batch([7] * b, caches[:b])
                            for c in caches[:b]:
                                c.length = L
                    wall = time.perf_counter() - t
                    if rep:
                        times[b].append((wall, k.seconds, native[0]))
        for b in batches:
            wall, mm, nat = (statistics.median(x[i] for x in times[b]) / args.steps for i in range(3))
            rows.append({"model": label, "runtime": runtime, "batch": b, "cache_tokens": L, "step_ms": 1e3 * wall,
                         "matmul_ms": 1e3 * mm, "rest_native_ms": 1e3 * (nat - mm), "python_ms": 1e3 * (wall - nat),
                         "tok_s": b / wall})
            print(json.dumps(rows[-1]), flush=True)
        del session, caches
    summary = {}
    for label in dict.fromkeys(r["model"] for r in rows):
        by = {r["batch"]: r for r in rows if r["model"] == label}
        if 1 in by and 8 in by:
            summary[f"{label}: batch-8 step's tok/s / batch-1 step's"] = round(by[8]["tok_s"] / by[1]["tok_s"], 2)
    config = {"name": args.name, "models": dict(m.split("=", 1) for m in args.model), "cache_tokens": L,
              "steps": args.steps, "repetitions": args.repetitions, "threads": args.threads or "all",
              "cpu": cpu_name(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    write_json(out / f"serve-step-{args.name}.json", {"config": config, "rows": rows, "summary": summary,
                                                      "versions": library_versions()})
    head = ("| model | batch | step ms | int8 matmuls ms | rest of native step ms | Python ms | tok/s |\n"
            "|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['model']} | {r['batch']} | {r['step_ms']:.1f} | {r['matmul_ms']:.1f} | "
                   f"{r['rest_native_ms']:.1f} | {r['python_ms']:.1f} | {r['tok_s']:.1f} |\n" for r in rows)
    (out / f"serve-step-{args.name}.md").write_text(
        f"# serve step: {args.name}, caches of {L} tokens\n\n{cpu_name()}; median of {args.repetitions} rounds of "
        f"{args.steps} steps, batch sizes interleaved; {json.dumps(config['models'])}\n\n" + head + body + "\n"
        + "".join(f"- {k}: {v}\n" for k, v in summary.items()))
    print(json.dumps(summary))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("load", "soak"):
        p = sub.add_parser(name)
        p.add_argument("--name", default="model")
        p.add_argument("--prompt-tokens", type=int, default=256)
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--threads", type=int, default=None, help="server threads (default: all cores)")
        p.add_argument("--timeout", type=float, default=600, help="seconds per level (soak: x20)")
        p.add_argument("--out", default=str(RESULTS))
    p = sub.choices["load"]
    p.add_argument("--model", action="append", required=True, help="LABEL=FOLDER (label 'dense': sparse-cpu-dense)")
    p.add_argument("--levels", default="1,2,4,8,16")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x clients, >= 4)")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (llama-quantize beside it)")
    p.add_argument("--gguf-from", default=None, help="the folder the GGUFs are written from (default: the first)")
    p.add_argument("--gguf-types", default="Q8_0,Q4_0,Q4_K_M")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench-serve"))
    p.add_argument("--no-single-stream", action="store_true", help="skip `benchmark --mode generate`")
    p.add_argument("--keep-llama", action="store_true",
                   help="time our models again and keep the llama-server rows of an earlier run of the same --name")
    p.add_argument("--llama-only", action="store_true",
                   help="time llama-server only; our rows come from the earlier serve-NAME.json")
    p = sub.add_parser("step")
    p.add_argument("--name", default="model")
    p.add_argument("--model", action="append", required=True, help="LABEL=FOLDER (label 'dense': sparse-cpu-dense)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cache-tokens", type=int, default=320, help="tokens in each cache (256 + 128 / 2: the load mean)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    p = sub.choices["soak"]
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kv-budget", type=float, default=1.0, help="GiB")
    args = ap.parse_args()
    {"load": load_cmd, "soak": soak_cmd, "step": step_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
