"""Collect the consumer check's results ($ROOT/work) into a markdown report.

usage: python report.py CONSUMER_ROOT OUT_MD
"""

import glob
import json
import os
import re
import sys
import time
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
w = root / "work"


def js(name):
    p = w / name
    return json.loads(p.read_text()) if p.is_file() else {}


def log(name):
    p = w / f"{name}.log"
    return p.read_text(errors="replace") if p.is_file() else ""


def versions(env, names):
    p = w / f"freeze-{env}.txt"
    have = dict(line.split("==", 1) for line in p.read_text().split() if "==" in line) if p.is_file() else {}
    return ", ".join(f"{n} {have[n]}" for n in names if n in have) or "(not installed)"


rows = []


def row(check, env, ok, detail):
    rows.append((check, env, {True: "pass", False: "**FAIL**", None: "as documented"}[ok], detail))


ds = js("ds-pipeline.json")
row("DeepSparse `TextGeneration(model_path=KV copy, internal_kv_cache=False)`, greedy", "ds",
    ds.get("pass", False) if ds else False,
    f"prompt token ids equal transformers': {ds.get('prompt_ids_equal')}; first {ds.get('new_tokens')} generated "
    f"tokens equal transformers' greedy ones: {ds.get('first_tokens_equal')} (it returns "
    f"{ds.get('returned_tokens')} for max_new_tokens={ds.get('new_tokens')}); compile + load "
    f"{ds.get('load_s', 0):.0f} s" if ds else f"no result (rc {js('ds-pipeline.rc.json')})")

dyn = log("ds-benchmark-dynamic")
fell_back = "Optimized runtime disabled" in dyn or "onnxruntime" in dyn.lower()
row("`deepsparse.benchmark model.onnx` (no -shapes)", "ds", None if fell_back else False,
    "falls back to ONNX Runtime on the dynamic inputs, as DeepSparse documents" if fell_back else "see log")
fixed = log("ds-benchmark-shapes")
m = re.search(r"Latency Median \(ms/batch\): ([\d.]+)", fixed)
engine = "deepsparse.engine.Engine" in fixed and "Optimized runtime disabled" not in fixed
frac = re.search(r"fraction_of_supported_ops: ([\d.]+)", fixed)
row('`deepsparse.benchmark COPY/model.onnx -shapes "[1,400],[1,400]"`', "ds", bool(engine and m),
    (f"DeepSparse engine, fraction_of_supported_ops {frac.group(1) if frac else '?'}, median "
     f"{m.group(1)} ms per 1 x 400 tokens (busy 2-core machine)" if m else "no latency in log")
    + ("; it rewrote the copy's model.onnx in place (fixed shapes)" if js("ds-benchmark-rewrite.json").get("copy_rewritten") else ""))

for name, label, expect_ok in [("ct-hf4", "transformers 4.57 `from_pretrained(compressed, torch_dtype=float32)`", True),
                               ("ct-hf4-default", "transformers 4.57 `from_pretrained(compressed)` (default dtype)", None),
                               ("ct-hf5", "transformers 5.24 + compressed-tensors >= 0.15 `from_pretrained(compressed)`", None)]:
    r = js(f"{name}.json")
    env = name.split("-")[1]
    if not r:
        row(label, env, False, f"no result (rc {js(name + '.rc.json')})")
        continue
    if not r.get("loaded"):
        detail = f"refused: {r.get('error')}"
    else:
        detail = (f"{r['bit_identical']} of {r['tensors']} tensors bit-identical to the pruned folder; greedy "
                  f"tokens equal: {r['greedy_equal']}; rope_theta {r.get('rope_theta')}; tokenizer "
                  f"{r.get('tokenizer_class')}")
    ok = r["pass"] if expect_ok else None
    if name == "ct-hf5" and r.get("loaded") and r["bit_identical"] < r["tensors"]:
        detail = "**silently loads random weights** (known, docs/gpu.md): " + detail
    row(label, env, ok, detail)

res = sorted(glob.glob(str(w / "lm-eval" / "**" / "results*.json"), recursive=True))
if res:
    r = json.loads(Path(res[-1]).read_text())["results"]["wikitext2_local"]
    wp = next(v for k, v in r.items() if k.startswith("word_perplexity"))
    row("lm-eval `--tasks wikitext2_local --include_path scripts/lm_eval` on the pruned folder", "lmeval", True,
        f"word_perplexity {wp:.2f} over the first {os.environ.get('LMEVAL_LIMIT', '2')} WikiText-2 articles (`--limit`)")
else:
    row("lm-eval with the local WikiText-2 task", "lmeval", False, f"no results (rc {js('lm-eval.rc.json')})")

envs = {"ds": versions("ds", ["deepsparse", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy", "torch", "pyarrow"]),
        "hf4": versions("hf4", ["transformers", "tokenizers", "compressed-tensors", "torch", "accelerate"]),
        "hf5": versions("hf5", ["transformers", "tokenizers", "compressed-tensors", "torch"]),
        "lmeval": versions("lmeval", ["lm_eval", "transformers", "datasets", "torch"])}
lines = ["# Consumer check: third-party tools on sparse-export's folders, in their own environments", "",
         f"`bash scripts/check_consumers.sh`, run {time.strftime('%Y-%m-%d')} on this machine (2 cores). "
         "Artifacts: SmolLM2-135M pruned by `sparse-export prune` (SparseGPT 50% and 2:4, 8 x 256 C4 tokens), "
         "then `export onnx` (plain, last-token logits), `export onnx --kv-cache --max-length 256`, "
         "`export compressed` (2:4). The reference is transformers 5.24's greedy `generate` in the project venv "
         f"({ds and len(json.loads((w / 'ref50.json').read_text())['new_ids'])} new tokens after a chat-template prompt).", "",
         "| check | env | result | detail |", "|---|---|---|---|"]
lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
lines += ["", "Environments (throwaway venvs outside the repository, Python 3.11, from PyPI):", ""]
lines += [f"- `{k}`: {v}" for k, v in envs.items()]
lines += ["", "\"as documented\": the behaviour docs/interop.md and docs/gpu.md describe (a pitfall of the "
          "consumer, with the setting that avoids it), not a failure of the check."]
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
