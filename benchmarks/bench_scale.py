"""CPU speed at real sizes: dense vs 50% / 70% sparse, fp32 and INT8, DeepSparse and ONNX Runtime.

Random-weight models with the exact shapes of TinyLlama-1.1B, Llama-3.2-3B and Llama-3-8B (bf16 safetensors
shards, SmolLM2's tokenizer, benchmarks/make_random_model.py), plus SmolLM2-135M itself for scale. The sparse
models are pruned with magnitude (streamed, no calibration): speed depends on the sparsity pattern, not on
the values, and a random model has no accuracy to keep. INT8 graphs get their activation ranges from a few
windows of C4 text run through the model layer by layer. Honest for memory and speed, meaningless for
accuracy.

Every step runs in its own process (wall, CPU = user + system from wait4, peak RSS = the child's VmHWM):
prune, export, and each timing (one model on one runtime per process). A model of this size does not
fit beside its siblings, so the models of one runtime are timed one after another in the order dense,
50%, 70%, dense again; the two dense runs show how much the machine drifted.

  prefill: 1 x 400 tokens, last-token logits (plain graph, `benchmark --seqlen 400`)
  decode:  tokens/s over 128 new tokens after a 256-token prompt (KV-cache graph, `benchmark --mode generate`)

Bytes of weights a decode step reads: for every decoder Linear, int8 nonzeros + a 1-bit mask (the
sparse formats' index), dense int8 = 1 byte per weight; plus the LM head as exported (fp32 or int8).

  python benchmarks/bench_scale.py --shape tinyllama-1.1b --work /work/bench/scale
  python benchmarks/bench_scale.py --shape llama-3-8b --work /work/bench/scale --no-fp32 --no-prefill
  (decode needs the INT8 KV-cache graph, `export onnx --int8 --kv-cache`; --fp32-decode adds fp32 ones)
  python benchmarks/bench_scale.py --table          # combine benchmarks/results/scale-*.json into scale.md
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sparse_export.outputs import cpu_name, library_versions, write_json
from sparse_export.report import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_spec = importlib.util.spec_from_file_location("make_random_model", Path(__file__).with_name("make_random_model.py"))
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)  # the sibling generator script (benchmarks/ is not a package)
SHAPES, write_model = _gen.SHAPES, _gen.write_model

# Runs the CLI in this process and leaves its peak RSS (VmHWM) in the file named by $SE_PEAK_FILE.
LAUNCH = """
import os, sys, atexit
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(os.environ['SE_PEAK_FILE'], 'w').write(str(int(line.split()[1]) / 2**20))
atexit.register(_peak)
sys.argv = ['sparse-export'] + sys.argv[1:]
from sparse_export.cli.main import run
run()
"""

# DeepSparse's per-operator breakdown of one 1 x N forward through a plain graph (argv: folder, N, threads, out).
PROFILE = """
import sys
from sparse_export.runtimes.deepsparse_rt import prefill_profile
folder, n, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None, sys.argv[4]
open(out, 'w').write(prefill_profile(folder, n, threads, iterations=1, warmup=1))
"""


def run_measured(args: list, log: Path) -> dict:
    """`sparse-export ARGS` in a child process: wall s, CPU s (wait4), peak RSS GiB (the child's VmHWM)."""
    peak_file = log.with_suffix(".peak")
    env = {**os.environ, "SE_PEAK_FILE": str(peak_file)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    peak = float(peak_file.read_text()) if peak_file.exists() else None
    result = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": peak, "exit": code}
    if code != 0:
        tail = log.read_text()[-1500:]
        print(f"  FAILED ({code}): sparse-export {' '.join(map(str, args[:3]))} ...\n{tail}", flush=True)
    return result


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "sparse_export.json").read_text())


def decode_bytes(meta: dict) -> dict:
    """Weight bytes one decode step reads, from the deployment's own weight table (counted in the file):
    decoder Linear layers as int8 (dense, or nonzeros + 1-bit mask) or fp32 (nonzeros + mask when sparse),
    and the rest read whole each step (the LM head; embeddings are a one-row lookup and not counted)."""
    total = {"linear_dense_int8": 0, "linear_sparse_int8": 0, "linear_fp32": 0, "other": 0}
    for w in meta.get("weights", {}).values():
        size = 1
        for d in w["shape"]:
            size *= d
        nnz = size - w["zeros"]
        if w.get("op") == "Gather" or w.get("op") is None:
            continue
        if w.get("op") == "MatMulInteger":
            total["linear_dense_int8"] += size
            total["linear_sparse_int8"] += nnz + size / 8 if w["zeros"] else size   # the head: read dense
        elif w.get("prunable"):
            fp32 = 4 * nnz + size / 8 if w["zeros"] else 4 * size
            total["linear_fp32"] += fp32
            total["linear_dense_int8"] += fp32      # a Linear the int8 export kept fp32
            total["linear_sparse_int8"] += fp32
        else:
            total["other"] += 4 * size
    return total


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.work / args.shape
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.res_file = RESULTS / f"scale-{args.shape}.json"
        self.result = json.loads(self.res_file.read_text()) if self.res_file.exists() else {}
        self.result.setdefault("steps", {})
        self.result.setdefault("timings", {})
        self.result.update(shape=args.shape, cpu=cpu_name(), versions=library_versions())

    def save(self):
        write_json(self.res_file, self.result)

    def step(self, key: str, out: Path, args: list) -> dict | None:
        """Run a step unless its output folder is complete; record its cost once."""
        if (out / "sparse_export.json").exists() or (out / "config.json").exists() and key.startswith("model"):
            return self.result["steps"].get(key)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{key}: {' '.join(map(str, args[:2]))} ...", flush=True)
        r = run_measured(args, self.logs / f"{key}.log")
        print(f"  {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, peak {r['peak_rss_gib']} GiB", flush=True)
        if r["exit"] != 0:
            return None
        self.result["steps"][key] = r
        self.save()
        return r

    def dense(self) -> Path:
        if self.args.shape == "smollm2":
            from sparse_export.pruning.jobs import plain_copy

            return plain_copy("smollm2", self.work / "dense")
        out = self.work / "dense"
        if not (out / "config.json").exists():
            print(f"writing a random {self.args.shape} model ...", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            write_model(dict(SHAPES[self.args.shape]), out, log=lambda *_: None)
        return out

    def model(self, sparsity: float) -> Path:
        dense = self.dense()
        if sparsity == 0:
            return dense
        out = self.work / f"magnitude{int(sparsity * 100)}"
        self.step(f"prune-{int(sparsity * 100)}", out,
                  ["prune", dense, "--out", out, "--method", "magnitude", "--sparsity", sparsity, "--stream"])
        return out

    def export(self, label: str, src: Path, kind: str) -> Path | None:
        """kind: prefill-fp32 | prefill-int8 | decode-int8 | decode-fp32."""
        out = self.work / f"{label}-{kind}"
        args = ["export", "onnx", src, "--out", out]
        if kind.startswith("decode"):
            args += ["--kv-cache", "--max-length", self.args.prompt_tokens + self.args.new_tokens]
        if kind.endswith("int8"):
            args += ["--int8", "--calib", self.args.calib, "--nsamples", 4, "--calib-seqlen", 256]
        args += self.args.export_args
        r = self.step(f"export-{label}-{kind}", out, args)
        return out if (out / "sparse_export.json").exists() else None if r is None else out

    def profile(self, label: str, folder: Path) -> None:
        """--profile: DeepSparse's per-operator breakdown of the prefill, once per model (own process)."""
        key = f"prefill/{label}"
        if key in self.result.setdefault("profiles", {}):
            return
        out = self.logs / f"profile-{label}.txt"
        print(f"profile deepsparse {label} ...", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", PROFILE, folder, str(self.args.seqlen), str(self.args.threads or 0),
                                out], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if code != 0 or not out.exists():
            print(f"  profile FAILED ({code})", flush=True)
            return
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
        self.result["profiles"][key] = out.read_text()
        self.save()

    def time(self, mode: str, label: str, folder: Path, runtime: str, rep: int = 0) -> dict | None:
        key = f"{mode}/{runtime}/{label}/{rep}"
        if self.args.profile and mode == "prefill" and runtime == "deepsparse" and rep == 0:
            self.profile(label, folder)
        if key in self.result["timings"] and not self.args.retime:
            return self.result["timings"][key]
        js = self.logs / f"{mode}-{runtime}-{label}-{rep}.json"
        args = ["benchmark", folder, "--runtime", runtime, "--json", js, "--threads", self.args.threads or 0]
        if mode == "prefill":
            args += ["--seqlen", self.args.seqlen, "--warmup", self.args.warmup, "--iterations", self.args.iterations]
        elif mode == "step":      # one token, no cache: the weights a decode step reads, without attention
            args += ["--seqlen", 1, "--warmup", 3, "--iterations", self.args.step_iterations]
        else:
            args += ["--mode", "generate", "--prompt-tokens", self.args.prompt_tokens, "--new-tokens",
                     self.args.new_tokens, "--warmup", self.args.warmup, "--iterations", self.args.iterations]
        if not self.args.threads:
            args = args[:args.index("--threads")] + args[args.index("--threads") + 2:]
        print(f"{mode} {runtime} {label} ...", flush=True)
        r = run_measured(args, js.with_suffix(".log"))
        row = {"mode": mode, "runtime": runtime, "model": label, "rep": rep, "process": r}
        if r["exit"] == 0:
            res = json.loads(js.read_text())
            row.update(res["rows"][0], trust=res.get("trust"))
        else:
            row["failed"] = js.with_suffix(".log").read_text()[-600:]
        meta = read_meta(folder)
        row["bytes"] = decode_bytes(meta)
        row["prunable_sparsity"] = meta.get("prunable_sparsity")
        self.result["timings"][key] = row
        self.save()
        return row


def modes_of(args, kind: str) -> list[str]:
    """The plain graph gives the prefill (and with --step one token through it: the weight traffic of a
    decode step without the cache), the KV-cache graph the decode."""
    if kind.startswith("prefill"):
        return (["prefill"] if args.prefill else []) + (["step"] if args.step else [])
    return ["decode"]


def time_model(b: Bench, args, kind: str, label: str, folder: Path, rep: int) -> None:
    for mode in modes_of(args, kind):
        for rt in args.runtimes:
            b.time(mode, f"{label}-{prec_of(kind)}", folder, rt, rep=rep)


def graph(b: Bench, label: str, sparsity: float, kind: str, src: Path | None) -> tuple[Path | None, Path | None]:
    """The graph folder of one model and kind (exported unless already there), and the pruned source used."""
    out = b.work / f"{label}-{kind}"
    if (out / "sparse_export.json").exists():
        return out, src
    src = src or b.model(sparsity)
    return b.export(label, src, kind), src


def run_shape(args) -> None:
    b = Bench(args)
    labels = {"dense": 0.0, **{f"sparse{int(s * 100)}": s for s in args.sparsities}}
    plain = args.prefill or args.step                                   # plain graphs, last-token logits
    precs = (["fp32"] if args.fp32 else []) + (["int8"] if args.int8 else [])
    kinds = [f"prefill-{p}" for p in precs] if plain else []
    if args.decode:                                                      # KV-cache graphs
        kinds += (["decode-fp32"] if args.fp32 and args.fp32_decode else []) + (["decode-int8"] if args.int8 else [])
    if args.one_at_a_time and not args.prepare_only:
        return run_lean(b, args, labels, kinds)
    folders = {kind: {} for kind in kinds}
    for label, sparsity in labels.items():           # one pruned model at a time: disk
        src = None
        for kind in kinds:
            out, src = graph(b, label, sparsity, kind, src)
            if out is not None:
                folders[kind][label] = out
        if args.drop_pruned and sparsity and src is not None:
            shutil.rmtree(src, ignore_errors=True)
    if args.prepare_only:
        return
    for kind in kinds:
        found = folders[kind]
        for mode in modes_of(args, kind):
            for rt in args.runtimes:
                order = list(found) + (["dense"] if args.rerun and "dense" in found and len(found) > 1 else [])
                for i, label in enumerate(order):
                    b.time(mode, f"{label}-{prec_of(kind)}", found[label], rt, rep=int(i > 0 and label == "dense"))
        if args.cleanup:
            for v in found.values():
                shutil.rmtree(v, ignore_errors=True)
    write_table()


def prec_of(kind: str) -> str:
    return kind.split("-")[1]


def run_lean(b: Bench, args, labels: dict, kinds: list[str]) -> None:
    """Disk for two graphs at a time: each model is exported, timed on every runtime and its graphs deleted
    before the next one is built; the dense graphs stay for the rerun at the end (drift)."""
    dense = {}
    for label, sparsity in labels.items():
        src, outs = None, {}
        for kind in kinds:
            outs[kind], src = graph(b, label, sparsity, kind, src)
        if args.drop_pruned and sparsity and src is not None:
            shutil.rmtree(src, ignore_errors=True)
        for kind, out in outs.items():
            if out is None:
                continue
            time_model(b, args, kind, label, out, rep=0)
            if label == "dense":
                dense[kind] = out
            elif args.cleanup:
                shutil.rmtree(out, ignore_errors=True)
    for kind, out in dense.items():
        if args.rerun and len(labels) > 1:
            time_model(b, args, kind, "dense", out, rep=1)
        if args.cleanup:
            shutil.rmtree(out, ignore_errors=True)
    write_table()


def rows_of(result: dict) -> list[dict]:
    rows = []
    t = result.get("timings", {})
    for key, r in t.items():
        mode, rt, label, rep = key.split("/")
        if rep != "0" or r.get("failed"):
            continue
        model, prec = label.rsplit("-", 1)
        again = t.get(f"{mode}/{rt}/{label}/1")
        key_speed = "decode_tok_s" if mode == "decode" else "tokens_per_s"
        speed = r.get(key_speed)
        base_same = t.get(f"{mode}/{rt}/dense-{prec}/0", {})
        base_fp32 = t.get(f"{mode}/{rt}/dense-fp32/0", {})
        by = r["bytes"]
        lin = by["linear_sparse_int8"] if prec == "int8" and model != "dense" else (
            by["linear_dense_int8"] if prec == "int8" else by["linear_fp32"])
        bytes_tok = lin + by["other"]
        dense_by = base_same.get("bytes", by)
        dense_bytes = (dense_by["linear_dense_int8"] if prec == "int8" else dense_by["linear_fp32"]) + dense_by["other"]
        row = {"shape": result["shape"], "mode": mode, "runtime": rt, "model": model, "precision": prec,
               "median_ms": r.get("median_ms") or r.get("decode_ms_median"), "speed": speed,
               "x_dense_same": speed / base_same[key_speed] if speed and base_same.get(key_speed) else None,
               "x_dense_fp32": speed / base_fp32[key_speed] if speed and base_fp32.get(key_speed) else None,
               "dense_rerun": (again or {}).get(key_speed),
               "GB_per_token": bytes_tok / 1e9 if mode != "prefill" else None,
               "bytes_ratio": bytes_tok / dense_bytes if mode != "prefill" and dense_bytes else None,
               # the engine's own peak (it runs in an isolated child of the timed process, whose VmHWM
               # would miss it), else the process's
               "load_s": r.get("load_s"), "peak_rss_gib": r.get("peak_rss_gib") or r["process"]["peak_rss_gib"],
               "cpu_s": r["process"]["cpu_s"], "wall_s": r["process"]["wall_s"],
               "warnings": "; ".join((r.get("trust") or {}).get("warnings") or []) or None}
        rows.append(row)
    return rows


COLS = [("shape", "shape"), ("mode", "mode"), ("runtime", "runtime"), ("model", "model"), ("prec", "precision"),
        ("ms (prefill) / ms per token", "median_ms"), ("tokens/s", "speed"), ("x dense same precision", "x_dense_same"),
        ("x dense fp32", "x_dense_fp32"), ("dense rerun tokens/s", "dense_rerun"), ("GB read per token", "GB_per_token"),
        ("bytes vs dense", "bytes_ratio"), ("load/compile s", "load_s"), ("peak RSS GiB", "peak_rss_gib"),
        ("process CPU s", "cpu_s"), ("process wall s", "wall_s"), ("timing warnings", "warnings")]
STEP_COLS = [("shape", "shape"), ("step", "step"), ("wall s", "wall_s"), ("CPU s", "cpu_s"),
             ("peak RSS GiB", "peak_rss_gib")]


def profile_split(text: str) -> dict:
    """ms per part of a DeepSparse layer breakdown: dense matmuls (`gemm`), sparse matmul kernels (`ks_*`),
    the LM head (the kernel whose shape holds the vocabulary, 32000 or more), `pyramid` (DeepSparse's fused
    blocks of several operators, matmuls possibly among them), the rest."""
    import re

    from sparse_export.runtimes.deepsparse_rt import profile_entries

    total, entries = profile_entries(text)
    parts = {"total": total, "dense_matmul": 0.0, "sparse_matmul": 0.0, "lm_head": 0.0, "pyramid": 0.0}
    for group, kernel, ms in entries:
        if kernel is None:
            parts["pyramid"] += ms if group == "pyramid" else 0.0
        elif group == "gemm" or group.startswith("ks_"):
            dims = [int(d) for d in re.findall(r"\d+", kernel)]
            part = "lm_head" if max(dims, default=0) >= 32000 else "dense_matmul" if group == "gemm" else "sparse_matmul"
            parts[part] += ms
    parts["other"] = parts["total"] - sum(parts[k] for k in ("dense_matmul", "sparse_matmul", "lm_head", "pyramid"))
    return parts


PROFILE_COLS = [("shape", "shape"), ("profile", "key"), ("total ms", "total"), ("dense matmul ms", "dense_matmul"),
                ("sparse matmul ms", "sparse_matmul"), ("LM head ms", "lm_head"), ("pyramid ms", "pyramid"), ("other ms", "other")]


def write_table() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("scale-*.json"))]
    order = ["smollm2", "tinyllama-1.1b", "llama-3.2-3b", "llama-3-8b"]
    results.sort(key=lambda r: order.index(r["shape"]) if r["shape"] in order else 99)
    rows = [r for res in results for r in rows_of(res)]
    rows.sort(key=lambda r: (order.index(r["shape"]) if r["shape"] in order else 99, r["mode"], r["runtime"]))
    steps = [{"shape": res["shape"], "step": k, **v} for res in results for k, v in res.get("steps", {}).items()]
    profiles = [{"shape": res["shape"], "key": k, **profile_split(v)} for res in results
                for k, v in res.get("profiles", {}).items()]
    cpu = results[0]["cpu"] if results else cpu_name()
    text = (f"# CPU speed at real sizes\n\n{cpu}. Random-weight models with real shapes (speed and memory are "
            "honest, accuracy is meaningless); sparse = magnitude pruning, streamed. Prefill: 1 x 400 tokens, "
            "last-token logits. Decode: 128 new tokens after a 256-token prompt, KV-cache graph. One process per "
            "timing; the models of a runtime timed one after another (dense, 50%, 70%, dense again: the rerun "
            "column shows the drift). GB read per token: decoder Linear weights (int8 nonzeros + 1-bit mask when "
            "sparse, 1 byte per weight when dense int8, fp32 nonzeros otherwise) + the LM head as exported.\n\n"
            f"{table(rows, COLS)}\n\n## Cost of each step\n\n{table(steps, STEP_COLS)}\n")
    if profiles:
        text += ("\n## Where DeepSparse's prefill time goes\n\nIts per-operator profile (debug analysis, one "
                 "forward after one warm-up, separate from the timed runs); full breakdowns in the results JSON. "
                 f"Sparse kernels are the `ks_*` groups.\n\n{table(profiles, PROFILE_COLS)}\n")
    (RESULTS / "scale.md").write_text(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=[*SHAPES, "smollm2"])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--runtimes", nargs="+", default=["deepsparse", "onnxruntime"])
    ap.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=True, help="also fp32 graphs")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="also INT8 graphs")
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seqlen", type=int, default=400, help="prefill tokens")
    ap.add_argument("--profile", action="store_true", help="DeepSparse's per-operator profile of each prefill")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rerun", action=argparse.BooleanOptionalAction, default=True,
                    help="time the dense model again after the sparse ones (drift)")
    ap.add_argument("--step", action="store_true", help="also time 1-token forwards through the plain graph")
    ap.add_argument("--step-iterations", type=int, default=20, help="timed 1-token forwards (--step)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--calib", default=None, help="text for INT8 activation ranges (default: the C4 sample)")
    ap.add_argument("--export-args", nargs="*", default=[], help="extra `export onnx` flags")
    ap.add_argument("--fp32-decode", action="store_true", help="also fp32 KV-cache graphs (with --fp32)")
    ap.add_argument("--prepare-only", action="store_true", help="build the models and graphs, time nothing")
    ap.add_argument("--drop-pruned", action="store_true", help="delete each pruned folder once exported (disk)")
    ap.add_argument("--cleanup", action="store_true", help="delete each set of graphs once timed (disk)")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="export, time and (with --cleanup/--drop-pruned) delete one model at a time: disk for "
                         "two graphs (dense kept for the rerun); the runtimes alternate per model")
    ap.add_argument("--retime", action="store_true", help="time again what the results already hold")
    ap.add_argument("--table", action="store_true", help="only rebuild benchmarks/results/scale.md")
    args = ap.parse_args()
    if args.table:
        return write_table()
    if not args.shape or not args.work:
        ap.error("--shape and --work are required (or --table)")
    if args.calib is None:
        from sparse_export import data

        c4 = data.shared_asset("c4-sample", "c4-train.00000-of-01024.head1041.jsonl")
        if c4 is None:
            sys.exit("benchmark skipped: ../shared/assets is absent")
        args.calib = str(c4)
    run_shape(args)


if __name__ == "__main__":
    main()
