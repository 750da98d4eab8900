"""report.md's sections for `prune-and-export --target cpu`, from the report dict (report.json)."""

from ..export.validate import INT8_NOISE_FACTOR
from ..measure.generation import generation_table
from ..measure.machine import trust_line
from ..measure.prefill import prefill_table
from ..pruning.pruners import PRUNERS
from ..report import fmt, table

# SparseGPT paper (Frantar & Alistarh 2023): end-to-end DeepSparse speedup of OPT-2.7B on CPU
PAPER_OPT_2_7B = {0.4: 1.57, 0.5: 1.82, 0.6: 2.16}


def cpu_sections(r: dict, out_name: str) -> list[tuple[str, str]]:
    """Every section, in order; out_name: how commands refer to the output folder."""
    rows = r["benchmark"]["rows"]
    v = r["verify"]
    plan = r.get("plan") or {}
    out = [("Summary", _summary(r))]
    if r["warnings"]:
        out.insert(0, ("Warnings", "\n".join(f"- **{w}**" for w in r["warnings"])))
    if r["prune"].get("allocation"):
        out.append(("Sparsity per layer", _allocation(r["prune"]["allocation"])))
    if plan.get("streamed"):
        out.append(("Skipped on the streamed path", plan["skipped"][0].upper() + plan["skipped"][1:] + "."))
    else:
        out.append(("Accuracy", _accuracy(r["accuracy"], v["perplexity"])))
    out.append(("Side by side", _side_by_side(v["perplexity"], rows)))
    agree = table(v["agreement"], [("model", "model"), ("runtime", "runtime"),
                                   ("max abs diff vs torch", "max_abs_diff"),
                                   ("max abs output", "max_abs_output"), ("tolerance", "tolerance")])
    if plan.get("streamed"):
        first = next(iter(v["agreement"]), {})
        how = (f"Each graph as its streamed export checked it: ONNX Runtime on {first.get('inputs', 'random tokens')} "
               f"against torch run one decoder layer at a time from the shards (layers checked: "
               f"{', '.join(str(a.get('layers_checked')) for a in v['agreement'])}; a truncated check runs the "
               f"first layers and the head when the whole graph would not fit the memory budget). The "
               f"benchmark's own outputs ({v['inputs']}) have no whole-model torch reference on this path.")
        out.append(("Correctness", f"{how}\n\n{agree}"))
    else:
        out.append(("Correctness", f"Outputs on {v['inputs']}, against the torch model in eval mode.\n\n{agree}"))
    if v["perplexity"]:
        ppl = [{**x, "model": k} for k, x in v["perplexity"].items()]
        out.append(("Perplexity", table(ppl, [("model", "model"), ("data", "data"), ("windows", "windows"),
                                              ("seqlen", "seqlen"), ("perplexity", "perplexity")])))
    b = r["benchmark"]
    c = b["config"]
    out.append(("Speed", f"Forward pass over {c['batch']} x {c['seqlen']} tokens, threads: {c['threads']}, "
                         f"{c['warmup']} warmup + {c['iterations']} timed runs, models of one runtime timed "
                         f"interleaved, CPU {c['cpu']}. Load time (DeepSparse: compilation) is apart from latency. "
                         f"CPU ms: process CPU time per run (all threads); min ms beside the median shows the "
                         f"spread." + ("" if "dense" in r["export"] else
                                       " The baseline is the dense model's INT8 graph (`onnx-dense-int8/`)."
                                       if "dense-int8" in r["export"] else
                                       " No dense graph was benchmarked: there is no speedup over dense, and "
                                       "`x dense ORT` is relative to the first model on ONNX Runtime.")
                         + "\n\n" + prefill_table(b) + "\n\n" + trust_line(b["trust"])))
    out.append(("Against the paper", _paper_section(rows, r["prune"]["pruned_sparsity"])))
    g = r.get("generate") or {}
    if "rows" in g:
        c = g["config"]
        out.append((f"Generation ({c['prompt_tokens']}-token prompt, {c['new_tokens']} new tokens, batch 1)",
                    _generation_text(g)))
    elif g.get("skipped") and g["skipped"] != "--no-generate":
        out.append(("Generation", f"Not measured: {g['skipped']}."))
    crashes = ([{**x, "benchmark": "prefill"} for x in b.get("crashes", [])]
               + [{**x, "benchmark": "generation"} for x in g.get("crashes", [])])
    if crashes:
        out.append(("Engine crashes", _crashes(crashes, r, out_name)))
    out.append(("How to deploy this", _deploy_guide(r, out_name)))
    return out


def _generation_text(g: dict) -> str:
    """The generation table, what its runtimes ran, its timing conditions and plot."""
    runtimes = {x["runtime"] for x in g["rows"]}
    notes = ["tokens/s = 1000 / ms per token (median step)."]
    if runtimes & {"sparse-cpu", "sparse-cpu-dense"}:
        notes.append("`sparse-cpu` runs `pruned-model/` itself on our int8 kernels (each matrix as a bitmask of "
                     "its nonzeros where that reads fewer bytes) and `sparse-cpu-dense` the dense model with every "
                     "matrix dense int8 (rounded per row): no graph, no engine; their speedups are sparse-cpu over "
                     "sparse-cpu-dense. DeepSparse and ONNX Runtime rows run the KV-cache graphs `dense-kv/` and "
                     "`sparse-kv/`.")
    if g.get("kv_skipped"):
        notes.append(f"KV-cache graphs not exported or timed: {g['kv_skipped']}.")
    text = generation_table(g) + "\n\n" + " ".join(notes)
    if g.get("trust"):
        text += "\n\n" + trust_line(g["trust"])
    return text + ("\n\n![decode speed](generate.png)" if g["rows"] else "")


def _summary(r: dict) -> str:
    e, s, rec = r["export"], r["prune"]["pruned_sparsity"], r["recipe"]
    plan = r.get("plan") or {}
    acc = r["accuracy"].get("sparse", {})
    owl = " (OWL: a sparsity per layer, see Sparsity per layer)" if r["prune"].get("allocation") else ""
    counted = "sparse" if "sparse" in e else "int8"
    lines = [
        f"- Model `{r['model']}`, pruned one-shot with {PRUNERS[rec['method']].title} to {s:.1%} of the "
        f"decoder-layer weights{owl} (calibration `{rec['calib']}`, {rec['nsamples']} x {rec['seqlen']} tokens).",
    ]
    if plan.get("streamed"):
        lines.append(f"- Streamed path (the model is not held in memory whole): prune "
                     f"{'streamed' if r['prune'].get('streamed') else 'in memory'}, every ONNX export streamed one "
                     f"decoder layer at a time; see Skipped on the streamed path"
                     + (", Perplexity." if r["verify"]["perplexity"] else
                        "; for WikiText-2 perplexity, rerun with `--eval-data path/to/wiki.test.raw`."))
    else:
        lines.append(
            f"- Accuracy: on {acc.get('tokens', 0)} held-out tokens the pruned model's most likely next token is "
            f"the dense model's {fmt(acc.get('top1_agreement'), '.1%')} of the time (KL divergence "
            f"{fmt(acc.get('kl_nats_per_token'), '.3f')} nats/token); see Accuracy"
            + ("." if r["verify"]["perplexity"] else
               "; for WikiText-2 perplexity, rerun with `--eval-data path/to/wiki.test.raw`."))
    if plan.get("skip_fp32"):
        lines.append(f"- fp32 graphs (`onnx-dense/`, `onnx-sparse/`) not exported or benchmarked: "
                     f"{plan['skip_fp32']}; only INT8 graphs are: `onnx-int8/`"
                     + (" and, as the baseline, the dense model's `onnx-dense-int8/` (its weights rounded per row)"
                        if "dense-int8" in e else "")
                     + (" (the KV-cache graphs of Generation are INT8 too)" if "rows" in (r.get("generate") or {})
                        else "") + ".")
    lines += [f"- {n[0].upper() + n[1:]}." for n in plan.get("notes", [])]
    lines += [
        f"- Sparsity counted in `onnx-{counted}/model.onnx`: {e[counted]['prunable_sparsity']:.2%} over its "
        f"{e[counted]['prunable_matrices']} prunable matrices; each holds exactly the checkpoint's values, "
        f"so the zero counts equal the checkpoint's matrix by matrix. All weights: "
        f"{e[counted]['all_weights_sparsity']:.2%} (embeddings and LM head stay dense).",
        f"- Graph output: `{r['logits']}` logits (`last` = last position only, what a prefill needs).",
    ]
    text = "\n".join(lines)
    if "int8" in e:
        q = e["int8"]["quant"]
        text += (
            f"\n- INT8 (`onnx-int8/`): pruned jointly onto the int8 weight grid (SparseGPT rounds each kept "
            f"weight before propagating its error), so `{'onnx-sparse' if 'sparse' in e else 'pruned-model'}/` and "
            f"`onnx-int8/` hold the same weights. "
            f"{q['matmul_integer']} of {e['int8']['prunable_matrices']} Linear layers run as "
            f"QuantizeLinear -> MatMulInteger -> Cast -> Mul (activations uint8, static per-tensor ranges "
            f"from calibration); {len(q['fp32_linear'])} whose inputs carry massive outliers"
            + (f" or whose output their int8 input changes by more than {q['max_error']:g} (relative squared "
               f"error)" if q.get("max_error") else "") + f" "
            f"stay fp32. Attention score matmuls (query x key): {q['attention']['score_matmul']}; softmax, "
            f"probabilities x values, norms, embeddings and the LM head stay fp32. Sparsity counted in the file: "
            f"{e['int8']['prunable_sparsity']:.2%}. "
            + ("Its check ran the graph against torch with the same integer weights and the same activations "
               "fake-quantized, one layer at a time. " if plan.get("streamed") else
               "Its torch reference and perplexity use the same integer weights with the same activations "
               "fake-quantized. ") + f"Engines and torch round a few activations "
            f"differently and those differences spread, so the int8 tolerance is {INT8_NOISE_FACTOR:g}x the "
            f"largest change quantizing the activations makes to the torch logits.")
        if not rec.get("smooth") and plan.get("streamed"):
            text += (" Static int8 activations lose accuracy on models with outlier channels; `--smooth 0.8` "
                     "helps (docs/int8.md; `--int8-max-error` needs the in-memory path).")
        elif not rec.get("smooth"):
            text += (" Static int8 activations lose accuracy on models with outlier channels; "
                     "`--smooth 0.8 --int8-max-error 0.003` kept SmolLM2's INT8 graph within 4% of the fp32 sparse "
                     "graph at full INT8 speed (docs/int8.md).")
    return text


def _accuracy(acc: dict, ppl: dict) -> str:
    """Distribution shift against the dense model, perplexity when measured, greedy completions."""
    held = acc.get("held_out", {})
    rows = [{"model": m, "kl": a.get("kl_nats_per_token"), "kl90": a.get("kl_p90"),
             "top1": a.get("top1_agreement"), "ppl": ppl.get(m, {}).get("perplexity")}
            for m, a in acc.items() if m not in ("held_out", "completions")]
    lines = ["| model | KL from dense (nats/token) | KL p90 | top-1 agreement with dense | perplexity |",
             "|---|---|---|---|---|", "| dense | 0 | 0 | 100% | " + fmt(ppl.get("dense", {}).get("perplexity"), ".2f")
             + " |"]
    lines += [f"| {x['model']} | {fmt(x['kl'], '.4f')} | {fmt(x['kl90'], '.4f')} | {fmt(x['top1'], '.1%')} | "
              f"{fmt(x['ppl'], '.2f')} |" for x in rows]
    text = (f"Next-token distributions on {held.get('tokens', '?')} held-out tokens ({held.get('source', '?')}), "
            f"against the dense model: KL(dense || model) per token and how often the most likely next token is "
            f"the same. Data-free: no evaluation text needed. "
            + ("Perplexity: see Perplexity." if ppl else
               "Perplexity is measured when you pass `--eval-data` (e.g. the WikiText-2 raw test file).")
            + "\n\n" + "\n".join(lines))
    comp = acc.get("completions")
    if comp:
        models_ = [m for m in comp if m != "prompts"]
        head = "| prompt | " + " | ".join(models_) + " |"
        body = [f"| {p} | " + " | ".join(comp[m][i].replace("|", "\\|") for m in models_) + " |"
                for i, p in enumerate(comp["prompts"])]
        text += ("\n\nGreedy completions (16 new tokens), dense vs pruned:\n\n" + head + "\n|"
                 + "---|" * (len(models_) + 1) + "\n" + "\n".join(body))
    return text


def _allocation(a: dict) -> str:
    """OWL's per-layer sparsities: planned from the outlier ratios, and as counted in the checkpoint."""
    rows = [{"layer": x["layer"], "ratio": fmt(x["outlier_ratio"], ".2%"), "plan": fmt(x["sparsity"], ".1%"),
             "got": fmt(x.get("measured_sparsity"), ".1%")} for x in a["layers"]]
    return (f"OWL (Yin et al., 2024): a layer's outlier ratio is the share of its scores |W| x ||X|| above "
            f"{a['threshold']:g} x their mean ({a['measured_on']}); more outliers, lower sparsity, within "
            f"+-{a['lambda']:g} of {a['target_sparsity']:.0%}, the average over all pruned weights kept at "
            f"{a['planned_sparsity']:.2%}.\n\n"
            + table(rows, [("layer", "layer"), ("outlier ratio", "ratio"), ("planned sparsity", "plan"),
                           ("sparsity in the checkpoint", "got")]))


def _crashes(crashes: list[dict], r: dict, out_name: str) -> str:
    c = r["benchmark"]["config"]
    lines = ["An engine crashed during a measurement. The artifacts and the other results are kept; what "
             "crashed was retried once with one thread.", ""]
    for x in crashes:
        lines.append(f"- {x['benchmark']} benchmark, {x['runtime']} on {', '.join(x['models'])} (threads: "
                     f"{x['threads']}): {x['error']}. "
                     f"Retry: {x['retry']}.")
    threads = f" --threads {c['threads']}" if c["threads"] != "all" else ""
    commands = {"prefill": f"sparse-export benchmark {out_name}/onnx-sparse --baseline {out_name}/onnx-dense "
                           f"--runtime {{runtime}} --seqlen {c['seqlen']}{threads}",
                "generation": f"sparse-export benchmark {out_name}/sparse-kv --baseline {out_name}/dense-kv "
                              f"--mode generate --runtime {{runtime}} --iterations 1{threads}"}
    lines += ["", "To reproduce:", "", "```"]
    lines += list(dict.fromkeys(commands[x["benchmark"]].format(runtime=x["runtime"]) for x in crashes)) + ["```"]
    return "\n".join(lines)


def _deploy_guide(r: dict, out_name: str) -> str:
    """Each output folder, what it is for, and a command that runs it (ours and the engine's own)."""
    o = out_name
    rows = [
        ("pruned-model/", "the pruned checkpoint: a plain Hugging Face folder (safetensors)",
         f"`sparse-export eval {o}/pruned-model --data wiki.test.raw`; transformers: "
         f"`AutoModelForCausalLM.from_pretrained('{o}/pruned-model')`"),
        ("onnx-sparse/", "prefill graph of the pruned model for DeepSparse / ONNX Runtime",
         f"`sparse-export benchmark {o}/onnx-sparse --baseline {o}/onnx-dense --runtime deepsparse`; DeepSparse: "
         f"`deepsparse.compile_model('{o}/onnx-sparse/model.onnx', batch_size=1)`"),
        ("onnx-dense/", "the same graph of the original model (the baseline)",
         f"`sparse-export benchmark {o}/onnx-dense --runtime deepsparse`"),
    ]
    rows = [x for x in rows if not x[0].startswith("onnx-") or x[0][5:-1] in r["export"]]
    if "int8" in r["export"]:
        dense = next((f"onnx-{b}" for b in ("dense", "dense-int8") if b in r["export"]), None)
        base = f" --baseline {o}/{dense}" if dense else ""
        rows.append(("onnx-int8/", "the pruned model with int8 matmuls (fastest on DeepSparse)",
                     f"`sparse-export benchmark {o}/onnx-int8{base} --runtime deepsparse`"))
    if "dense-int8" in r["export"]:
        rows.append(("onnx-dense-int8/", "the original model with int8 matmuls (the INT8 baseline)",
                     f"`sparse-export benchmark {o}/onnx-dense-int8 --runtime deepsparse`"))
    gen_runtimes = {x["runtime"] for x in (r.get("generate") or {}).get("rows", [])}
    if "sparse-cpu" in gen_runtimes:
        rows.insert(1, ("pruned-model/ on sparse-cpu", "the pruned checkpoint on our own int8 runtime: bitmask-packed "
                        "weights, no graph (our fastest decode; see Generation)",
                        f"`sparse-export generate {o}/pruned-model \"The capital of France is\" --runtime sparse-cpu`; "
                        f"speed: `sparse-export benchmark {o}/pruned-model --mode generate --runtime sparse-cpu`"))
        rows.insert(2, ("the dense model on sparse-cpu-dense", "the original model on the same kernels, every matrix "
                        "dense int8 (the baseline)",
                        f"`sparse-export generate {r['model']} \"The capital of France is\" --runtime sparse-cpu-dense`"))
    g = r.get("generate") or {}
    if {x["runtime"] for x in g.get("rows", []) + g.get("crashes", [])} & {"deepsparse", "onnxruntime"}:
        rows += [("sparse-kv/", "KV-cache graph of the pruned model: text generation",
                  f"`sparse-export generate {o}/sparse-kv \"The capital of France is\" --runtime deepsparse`"),
                 ("dense-kv/", "the same for the original model (the baseline)",
                  f"`sparse-export benchmark {o}/sparse-kv --baseline {o}/dense-kv --mode generate`")]
    rows.append(("report.md, report.json, latency.png" + (", generate.png" if gen_runtimes else ""),
                 "this report; report.json has every number, paths relative to this folder", ""))
    lines = ["| folder | what it is | run it |", "|---|---|---|"]
    lines += [f"| `{a}` | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


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
