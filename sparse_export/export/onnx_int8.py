"""INT8 deployment folders: the Linear layers of the decoder run as integer matmuls.

Each MatMul (or Gemm) that reads a decoder Linear weight becomes

    x -> QuantizeLinear (uint8, static per-tensor scale / zero point from calibration)
      -> MatMulInteger (uint8 activations x int8 weights, int32 result)
      -> Cast (float) -> Mul (activation scale x weight scale, per output channel) [-> Add bias]

the form DeepSparse 1.8 fuses into one sparse int8 kernel (it does not fuse a plain
QuantizeLinear/DequantizeLinear graph, which runs slower than fp32 there); ONNX Runtime runs it too.
Modules that share an input (q/k/v, gate/up) share one QuantizeLinear. The attention score matmul
(query x key^T) becomes the same form with both operands quantized (query uint8, key int8, static
per-tensor scales) where the architecture's attention is the standard one (archs.STANDARD_ATTENTION):
it costs about 0.4% perplexity on SmolLM2 and saves ~12% of the int8 model's time in DeepSparse.
Softmax and the probabilities x values matmul stay fp32 (uint8 probabilities cost +57% perplexity
there: the many small probabilities round to zero), as do norms, embeddings and the Linear layers
whose inputs carry massive outliers (see prepare_int8).

The LM head takes the Linears' form too (by default; --fp32-head keeps it fp32): its weight rounded to
nearest on an int8 grid with one scale per vocabulary row, its input (the final norm's output) uint8
with a static per-tensor scale from the same calibration pass. A tied head gets its own int8
initializer; the embedding's Gather keeps its fp32 table. An outlier-heavy head input (the decoder
Linears' outlier_ratio test) keeps the head fp32; sparse_export.json's int8.head says which and why.

Weights of a --wbits 8 model are already on their grid: the recorded scales make the int8 values
exact. Other models are rounded to nearest (per output channel) first.
"""

import time
from pathlib import Path

import numpy as np
import torch

from .. import data, models
from ..errors import UserError
from ..outputs import META_FILE, atomic_dir, read_meta, write_json
from ..pruning.grid import check_int8_grid, grid_info, grid_tolerance, int_weight, recorded_scales, round_weights
from ..pruning.pruners import PRUNERS
from .graph import ONNX_FILE, digest, load_onnx, match_modules, save_onnx, sparsity_summary, weight_sparsity
from .int8_calib import act_qparams, activation_ranges, attention_qparams, fake_int8, input_quant_errors
from .int8_calib import grid_head, head_choice, head_is_tied, head_module, recording_attention
from .int8_calib import outlier_ratio as quant_outlier_ratio
from .onnx_plain import write_deployment
from .validate import CHECK_BATCH, CHECK_TOKENS, int8_tolerance, reference_output, validate_plain

ACT_NSAMPLES, ACT_SEQLEN = 32, 512   # calibration for activation ranges (one forward pass)
OUTLIER_RATIO = 10.0


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


def _linear_weight(node, inits):
    """(initializer name, out x in weight) when `node` is a plain x @ W (+ C) with W an initializer."""
    from onnx import numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                   or _attr(node, "beta", 1.0) != 1.0):
        return None
    arr = numpy_helper.to_array(inits[node.input[1]])
    if arr.ndim != 2 or arr.dtype != np.float32:
        return None
    return node.input[1], arr if _attr(node, "transB", 0) else arr.T


def quantize_graph(proto, model, weight_scales: dict, act_params: dict) -> dict[str, dict]:
    """Rewrite `proto` (fp32, traced from `model`) in place into the fused int8 form.

    weight_scales: {module: scale per output row}; the module's weight must lie on that grid.
    act_params:    {module: (scale, zero point)} for its uint8 input.
    Returns {module: {"initializer", "input", "zeros", "size"}} for every quantized matmul.
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    want = {digest(models.weight_2d(model.get_submodule(n)).float().numpy()): n for n in weight_scales}
    consumers = {}
    for node in g.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1

    new_nodes, new_inits, done, quantized_inputs, replaced = [], [], {}, {}, set()
    for node in g.node:
        hit = _linear_weight(node, inits)
        module = want.get(digest(hit[1])) if hit else None
        if module is None or module in done:
            new_nodes.append(node)
            continue
        w_name, W = hit
        w_scale = np.asarray(weight_scales[module], np.float32)
        ints = int_weight(torch.from_numpy(np.array(W)), w_scale, name=module).numpy()  # out x in
        q_nodes, q_inits = int8_matmul(node, ints, w_scale, act_params[module], module, quantized_inputs)
        new_nodes += q_nodes
        new_inits += q_inits
        consumers[w_name] -= 1
        replaced.add(w_name)
        done[module] = int8_row(module, node, ints)

    missing = sorted(set(weight_scales) - set(done))
    if missing:
        raise UserError(f"{missing[0]}: no MatMul in the ONNX graph reads its weight")
    keep = [t for t in g.initializer if t.name not in replaced or consumers[t.name] > 0]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    return done


def int8_row(tag: str, node, ints: np.ndarray) -> dict:
    """quantize_graph's entry for one rewritten matmul."""
    return {"initializer": f"{tag}.weight_int8", "input": node.input[0],
            "zeros": int(ints.size - np.count_nonzero(ints)), "size": int(ints.size)}


def int8_matmul(node, ints: np.ndarray, w_scale, act: tuple, tag: str, quantized_inputs: dict) -> tuple[list, list]:
    """The fused int8 form of the MatMul / Gemm `node` (x @ W (+ C)): (new nodes, new initializers).

    ints: W on its grid as int8, out x in; w_scale: per output row; act: (scale, zero point) of the uint8
    input. quantized_inputs {input: (QuantizeLinear output, scale, zero point)} is shared between calls so
    that matmuls reading one tensor share one QuantizeLinear (their activation scales must agree)."""
    from onnx import TensorProto, helper, numpy_helper

    x, y = node.input[0], node.output[0]
    a_scale, a_zp = act
    nodes, inits = [], []
    if x not in quantized_inputs:                  # one QuantizeLinear per shared input
        q = f"{tag}.input_quant"
        inits += [numpy_helper.from_array(np.array(a_scale, np.float32), q + ".scale"),
                  numpy_helper.from_array(np.array(a_zp, np.uint8), q + ".zero_point")]
        nodes.append(helper.make_node("QuantizeLinear", [x, q + ".scale", q + ".zero_point"], [q], name=q))
        quantized_inputs[x] = (q, a_scale, a_zp)
    q, s0, z0 = quantized_inputs[x]
    if (s0, z0) != tuple(act):
        raise UserError(f"{tag}: modules reading one tensor got different activation scales")
    w_scale = np.asarray(w_scale, np.float32)
    combined = (np.float32(a_scale) * w_scale).astype(np.float32)
    if np.all(combined == combined[0]):
        combined = combined[:1].reshape(())                 # per tensor: a scalar Mul
    inits += [numpy_helper.from_array(np.ascontiguousarray(ints.T), f"{tag}.weight_int8"),
              numpy_helper.from_array(np.array(0, np.int8), f"{tag}.weight_zero_point"),
              numpy_helper.from_array(combined, f"{tag}.rescale")]
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    mul_out = f"{tag}.rescaled" if has_bias else y
    nodes += [
        helper.make_node("MatMulInteger", [q, f"{tag}.weight_int8", q + ".zero_point", f"{tag}.weight_zero_point"],
                         [f"{tag}.int32"], name=f"{tag}.MatMulInteger"),
        helper.make_node("Cast", [f"{tag}.int32"], [f"{tag}.float"], name=f"{tag}.Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{tag}.float", f"{tag}.rescale"], [mul_out], name=f"{tag}.Mul")]
    if has_bias:
        nodes.append(helper.make_node("Add", [mul_out, node.input[2]], [y], name=f"{tag}.Add"))
    return nodes, inits


def _scores_matmuls(g):
    """{module scope: node} for each MatMul of two activations whose result reaches a Softmax through
    elementwise ops only (scaling, mask): the attention score matmul, query x key^T."""
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found = {}
    for node in g.node:
        if node.op_type != "Softmax":
            continue
        todo, seen = [node.input[0]], set()
        while todo:
            n = producer.get(todo.pop())
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "MatMul" and not set(n.input) & inits:
                found[n.name.rsplit("/", 1)[0]] = n
            elif n.op_type in ("Mul", "Add", "Div", "Sub", "Cast", "Where", "Max", "Min"):
                todo += list(n.input)
    return found


def quantize_attention(proto, attention: dict) -> list[str]:
    """Rewrite the score matmul of each attention module in `attention` (from int8_calib.attention_qparams)
    into QuantizeLinear x2 -> MatMulInteger -> Cast -> Mul. Returns the module names done."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    # scopes drop some module names ("/lm/decoder/layers.0/self_attn" for model.decoder.layers.0.self_attn):
    # match on the last two, "layers.0.self_attn"
    by_key = {".".join(scope.replace("/", ".").split(".")[-3:]): node for scope, node in _scores_matmuls(g).items()}
    todo = {}
    for module in attention:
        node = by_key.get(".".join(module.split(".")[-3:]))
        if node is None:
            raise UserError(f"{module}: no attention score matmul found in the ONNX graph")
        todo[id(node)] = module
    new_nodes, new_inits = [], []
    for node in g.node:
        if id(node) not in todo:
            new_nodes.append(node)
            continue
        module = todo[id(node)]
        (q_scale, q_zp), k_scale = attention[module]["query"], attention[module]["key"]
        t = f"{module}.scores"
        new_inits += [numpy_helper.from_array(np.array(q_scale, np.float32), t + ".query_scale"),
                      numpy_helper.from_array(np.array(q_zp, np.uint8), t + ".query_zero_point"),
                      numpy_helper.from_array(np.array(k_scale, np.float32), t + ".key_scale"),
                      numpy_helper.from_array(np.array(0, np.int8), t + ".key_zero_point"),
                      numpy_helper.from_array(np.array(np.float32(q_scale) * np.float32(k_scale), np.float32),
                                              t + ".rescale")]
        new_nodes += [
            helper.make_node("QuantizeLinear", [node.input[0], t + ".query_scale", t + ".query_zero_point"],
                             [t + ".query_quant"], name=t + ".query_quant"),
            helper.make_node("QuantizeLinear", [node.input[1], t + ".key_scale", t + ".key_zero_point"],
                             [t + ".key_quant"], name=t + ".key_quant"),
            helper.make_node("MatMulInteger", [t + ".query_quant", t + ".key_quant", t + ".query_zero_point",
                                               t + ".key_zero_point"], [t + ".int32"], name=t + ".MatMulInteger"),
            helper.make_node("Cast", [t + ".int32"], [t + ".float"], name=t + ".Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [t + ".float", t + ".rescale"], [node.output[0]], name=t + ".Mul")]
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    return sorted(attention)


def prepare_int8(model, meta: dict, windows: torch.Tensor, percentile: float | None = None,
                 outlier_ratio: float | None = OUTLIER_RATIO, batch: int = 4,
                 stored_dtype: torch.dtype = torch.float32,
                 attention: bool = True, max_error: float | None = None, head: bool = True,
                 details: dict | None = None) -> tuple[dict, dict, dict, str, list[str]]:
    """Weight scales, activation qparams, attention qparams, and the modules left in fp32.

    Activation ranges are min/max, or clipped to `percentile`. A module whose input reaches more
    than `outlier_ratio` times beyond its 99.99th-percentile range (the massive activations some
    MLP down projections see) stays fp32: one uint8 step there would swallow ordinary values.
    None quantizes every module. max_error: also keep fp32 each module whose output its int8 input
    changes by more than this relative squared error (int8_calib.input_quant_errors; a second pass).
    Puts every weight exactly on its grid in place (a no-op for fp32 --wbits models; 16-bit storage
    is off by up to 0.03 (float16) or 0.5 (bfloat16) steps: pruning.grid.grid_tolerance), so `model`
    becomes the fake-quantized reference together with int8_calib.fake_int8. attention=False (or an
    architecture outside archs.STANDARD_ATTENTION) keeps the score matmuls fp32. head: also quantize the LM head (its input range from the same pass, kept fp32
    by the same outlier / max_error tests; its weight rounded to nearest per vocabulary row and untied
    from the embedding: int8_calib.grid_head); the scales and qparams then include it. `details`, when
    given, gets "head": the int8 metadata's head entry (int8_calib.head_choice). Returns (scales, qparams,
    attention qparams, weight source, fp32 modules: decoder Linears only).
    """
    names = models.prunable_names(model)
    check_int8_grid(meta)
    scales = recorded_scales(meta, names)
    tol = grid_tolerance(stored_dtype)
    with torch.no_grad():
        for n, s in scales.items():
            mod = model.get_submodule(n)
            ints = int_weight(models.weight_2d(mod), s, tol=tol, name=n)
            models.set_weight_2d(mod, ints.float() * torch.tensor(s).reshape(-1, 1))
    rest = [n for n in names if n not in scales]
    scales.update(round_weights(model, 8, True, rest))
    source = "recorded" if not rest else ("round-to-nearest" if len(rest) == len(names) else "mixed")
    hn = head_module(model)
    tied = hn is not None and head_is_tied(model, hn)
    measured = names + ([hn] if head and hn else [])
    with recording_attention(model, attention) as attn_ranges:    # one calibration pass for all
        ranges = activation_ranges(model, windows, measured, batch=batch, percentile=percentile or 99.99)
    fp32 = [n for n in names if outlier_ratio and quant_outlier_ratio(ranges[n]) > outlier_ratio]
    lohi = ("lo", "hi") if percentile else ("min", "max")
    qparams = {n: act_qparams(ranges[n][lohi[0]], ranges[n][lohi[1]]) for n in names if n not in fp32}
    choice = head_choice(hn, ranges.get(hn), outlier_ratio, tied, requested=head)
    if choice["dtype"] == "int8":
        qparams[hn] = act_qparams(ranges[hn][lohi[0]], ranges[hn][lohi[1]])
    if max_error:
        errors = input_quant_errors(model, windows, qparams, batch)
        fp32 = [n for n in names if n in fp32 or errors[n] > max_error]
        if hn in qparams and errors[hn] > max_error:
            choice.update(dtype="fp32", reason=f"its int8 input changes its output by {errors[hn]:.2g} "
                                               f"(relative squared error; --max-error {max_error:g})")
            choice.pop("weights", None)
        qparams = {n: q for n, q in qparams.items() if n not in fp32 and (n != hn or choice["dtype"] == "int8")}
    if choice["dtype"] == "int8":
        scales[hn] = grid_head(model, hn)
    if details is not None:
        details["head"] = choice
    return {n: scales[n] for n in qparams}, qparams, attention_qparams(attn_ranges), source, fp32


def read_qparams(meta: dict) -> tuple[dict, dict]:
    """(Linear qparams, attention qparams) recorded in an int8 deployment's sparse_export.json."""
    q = meta["int8"]
    linear = {n: (v["scale"], v["zero_point"]) for n, v in q["activations"]["qparams"].items()}
    attn = {n: {"query": (v["query_scale"], v["query_zero_point"]), "key": v["key_scale"]}
            for n, v in (q.get("attention") or {}).get("qparams", {}).items()}
    return linear, attn


def write_int8_deployment(model, tokenizer, folder, scales: dict, qparams: dict, attention: dict | None = None,
                          logits: str = "last", seqlen: int = 16, source=None, extra: dict | None = None,
                          log=print, head: dict | None = None) -> dict:
    """fp32 deployment folder, then its model.onnx rewritten to the fused int8 form. Returns metadata.

    The LM head is int8 when its module is in `scales` / `qparams` (prepare_int8's default); `head` is
    prepare_int8's record of that choice (without it, one is derived from qparams)."""
    t0 = time.perf_counter()
    head = head_entry(model, qparams, logits, head)
    hn = head_module(model)
    if hn is not None and head["dtype"] != "int8":
        scales = {n: v for n, v in scales.items() if n != hn}
        qparams = {n: v for n, v in qparams.items() if n != hn}
    meta = write_deployment(model, tokenizer, folder, logits, seqlen, source=source, validate=False,
                            log=lambda *_: None)
    path = Path(folder) / ONNX_FILE
    proto = load_onnx(path)
    done = quantize_graph(proto, model, scales, qparams)
    attention = attention or {}
    quantize_attention(proto, attention)
    save_onnx(proto, path)
    weights = weight_sparsity(path)
    problems = [x for x in match_modules(weights, path, model) if x.split(":")[0] not in done]
    if problems:                               # the fp32 matrices left: matched by value
        raise UserError(f"the exported weights do not match the model: {problems[0]}")
    for module, row in done.items():          # int8 initializers: named by us, module known
        weights[row["initializer"]].update(module=module, prunable=module != head["module"], op="MatMulInteger",
                                           transposed=True)
        w = models.weight_2d(model.get_submodule(module))
        if row["zeros"] != int((w == 0).sum()):
            raise UserError(f"{module}: zero count changed in the int8 export")
    meta.update(sparsity_summary(weights), weights=weights, export_s=time.perf_counter() - t0)
    meta["validation"] = validate_int8(model, path, logits, qparams, attention)
    linear = len(set(done) - {head["module"]})
    meta["int8"] = int8_fields(linear, sorted(set(models.prunable_names(model)) - set(done)), scales, qparams,
                               attention, extra, head)
    write_json(Path(folder) / META_FILE, meta)
    log(f"exported {linear} int8 Linear matmuls, the LM head in {head['dtype']} and {len(attention)} int8 "
        f"attention score matmuls at "
        f"{meta['prunable_sparsity']:.1%} sparsity "
        f"(counted in the ONNX file), logits={logits}")
    return meta


def head_entry(model, qparams: dict, logits: str, head: dict | None = None) -> dict:
    """The int8 metadata's "head" entry for a graph written with `logits` from these qparams: `head` (from
    prepare_int8) as it is, or derived from whether the head's module has activation qparams."""
    hn = head_module(model)
    if logits == "none":
        return head_choice(None, None, None, False) | {"reason": "logits=none: the graph has no LM head"}
    if head is not None:
        return head
    tied = hn is not None and head_is_tied(model, hn)
    out = head_choice(hn, None, None, tied, requested=False)
    if hn in qparams:
        out.update(dtype="int8", reason=None, weights="int8 symmetric, one scale per vocabulary row")
    else:
        out["reason"] = "not calibrated"
    return out


def int8_fields(matmul_integer: int, fp32_linear: list, scales: dict, qparams: dict, attention: dict,
                extra: dict | None = None, head: dict | None = None) -> dict:
    """The "int8" entry of an INT8 deployment's sparse_export.json. matmul_integer and fp32_linear count the
    decoder Linears; `head` says how the LM head runs (its qparams, when int8, are among the activations')."""
    head = head or {"module": None, "dtype": "fp32", "reason": "not recorded"}
    linear_scales = [s for n, s in scales.items() if n != head["module"]]
    return {
        "form": "QuantizeLinear -> MatMulInteger -> Cast -> Mul [-> Add]",
        "matmul_integer": matmul_integer,
        "fp32_linear": fp32_linear,
        "head": head,
        "weights": grid_info(8, any(len(set(s)) > 1 for s in linear_scales), "see weight_source"),
        "activations": {"dtype": "uint8", "granularity": "per-tensor", "static": True,
                        "qparams": {n: {"scale": s, "zero_point": z} for n, (s, z) in qparams.items()}},
        "attention": {"score_matmul": "int8" if attention else "fp32", "query": "uint8 per-tensor",
                      "key": "int8 symmetric per-tensor", "probabilities_x_values": "fp32",
                      "qparams": {n: {"query_scale": p["query"][0], "query_zero_point": p["query"][1],
                                      "key_scale": p["key"]} for n, p in attention.items()}},
        "fp32_ops": ("" if attention else "attention score matmuls, ") + "softmax, probabilities x values "
                    "matmuls, norms, embeddings, " + ("" if head["dtype"] == "int8" else "LM head, ") + "fp32_linear",
        **(extra or {}),
    }


def validate_int8(model, onnx_file, logits: str, qparams: dict, attention: dict) -> dict:
    """The int8 graph on ONNX Runtime against the torch model with the same integer weights and its
    activations fake-quantized like the graph's (validate.int8_tolerance)."""
    inputs = data.random_tokens(model.config.vocab_size, CHECK_BATCH, CHECK_TOKENS)
    fp32 = reference_output(model, logits, *inputs)
    with fake_int8(model, qparams, attention):
        ref = reference_output(model, logits, *inputs)
    return validate_plain(model, onnx_file, logits, reference=ref, tolerance=int8_tolerance(ref, fp32), inputs=inputs)


def int8_calibration(model_spec, calib: str | None = None, nsamples: int | None = None,
                     seqlen: int | None = None, seed: int | None = None) -> dict:
    """Calibration text and sizes for the activation ranges: the options given, else the pruned folder's
    recipe (its calibration source and seed; nsamples and seqlen capped at the int8 defaults, as
    `prune-and-export --int8` does), else c4 with the int8 defaults. Returns {source, nsamples, seqlen,
    seed, from} ("from": "options" | "recipe" | "defaults", for the source)."""
    recipe = {}
    if Path(str(model_spec)).is_dir():
        recipe = read_meta(model_spec).get("recipe") or {}
        if recipe.get("method") in PRUNERS and not PRUNERS[recipe["method"]].needs_calibration:
            recipe = {}  # a magnitude prune never read its calibration source
    origin = "options" if calib else ("recipe" if recipe.get("calib") else "defaults")
    out = {"source": str(calib or recipe.get("calib") or "c4"),
           "nsamples": nsamples or min(recipe.get("nsamples") or ACT_NSAMPLES, ACT_NSAMPLES),
           "seqlen": seqlen or min(recipe.get("seqlen") or ACT_SEQLEN, ACT_SEQLEN),
           "seed": recipe.get("seed", 0) if seed is None else seed, "from": origin}
    if origin == "recipe" and _looks_like_file(out["source"]) and not Path(out["source"]).is_file():
        raise UserError(f"the recipe's calibration file {out['source']} is not here (it is read relative to "
                        f"the current folder); pass --calib")
    return out


def _looks_like_file(source: str) -> bool:
    return source.endswith((".txt", ".jsonl", ".json")) or "/" in source


def export_int8(model_spec, out, calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
                seed: int | None = None, percentile: float | None = None,
                outlier_ratio: float | None = OUTLIER_RATIO, attention: bool = True, logits: str = "last",
                trace_seqlen: int = 16, force: bool = False, log=print, max_error: float | None = None,
                head: bool = True) -> dict:
    """`export onnx --int8`: load MODEL, calibrate activations, write the int8 deployment folder.

    Calibration not given here comes from the pruned folder's recipe (int8_calibration). max_error:
    see prepare_int8. head=False (--fp32-head) keeps the LM head fp32."""
    check_int8_options(percentile, outlier_ratio, max_error)
    cal = resolve_calibration(model_spec, calib, nsamples, seqlen, seed, log)
    with atomic_dir(out, force) as tmp:
        model, tokenizer = models.load_model(model_spec)
        stored_dtype = model.dtype
        model.float()
        c = calibrate(model, tokenizer, model_spec, cal, percentile, outlier_ratio, stored_dtype, attention,
                      max_error, head and logits != "none")
        meta = write_int8_deployment(model, tokenizer, tmp, c["scales"], c["qparams"], c["attention"], logits,
                                     trace_seqlen, source=model_spec, extra=c["extra"], log=log, head=c["head"])
    log(f"wrote {out}")
    return meta


def check_int8_options(percentile: float | None, outlier_ratio: float | None, max_error: float | None) -> None:
    """One-line errors for INT8 options out of range, before any work."""
    if max_error is not None and not max_error > 0:
        raise UserError(f"--max-error must be > 0 (a relative squared error, e.g. 0.005), got {max_error}")
    if percentile is not None and not 50 < percentile < 100:
        raise UserError(f"--percentile must be in (50, 100), got {percentile}")
    if outlier_ratio is not None and outlier_ratio < 0:
        raise UserError(f"--outlier-ratio must be >= 0 (0: quantize every layer), got {outlier_ratio}")


def resolve_calibration(model_spec, calib: str | None, nsamples: int | None, seqlen: int | None,
                        seed: int | None, log=print) -> dict:
    """int8_calibration for an in-memory export, its source checked (`self` allowed) and where it came
    from logged when it is the recipe's."""
    cal = int8_calibration(model_spec, calib, nsamples, seqlen, seed)
    data.check_source(cal["source"], allow_self=True)
    if cal["from"] == "recipe":
        log(f"int8 calibration from the recipe in {model_spec}: {cal['source']}, "
            f"{cal['nsamples']} x {cal['seqlen']} tokens, seed {cal['seed']}")
    return cal


def int8_extra(weight_source: str, cal: dict, percentile: float | None, outlier_ratio: float | None,
               max_error: float | None, smooth) -> dict:
    """int8_fields' `extra`: how the weights and activation ranges were obtained (smooth: the SmoothQuant
    alpha of the prune, from its recipe)."""
    return {"weight_source": weight_source, "outlier_ratio": outlier_ratio, "max_error": max_error,
            "calibration": {**cal, "range": f"percentile {percentile}" if percentile else "min/max"},
            "smooth": smooth}


def calibrate(model, tokenizer, model_spec, cal: dict, percentile: float | None, outlier_ratio: float | None,
              stored_dtype: torch.dtype, attention: bool, max_error: float | None, head: bool) -> dict:
    """prepare_int8 on the in-memory model over the calibration windows of `cal` (resolve_calibration):
    {scales, qparams, attention, head (the metadata's head entry), fp32, extra (int8_extra)}. Puts the
    weights on their grid in place."""
    src_meta = read_meta(model_spec) if Path(str(model_spec)).is_dir() else {}
    windows = data.calibration_windows(cal["source"], tokenizer, cal["nsamples"], cal["seqlen"], cal["seed"],
                                       model=model)
    details = {}
    scales, qparams, attn, how, fp32 = prepare_int8(model, src_meta, windows, percentile, outlier_ratio,
                                                    stored_dtype=stored_dtype, attention=attention,
                                                    max_error=max_error, head=head, details=details)
    extra = int8_extra(how, cal, percentile, outlier_ratio, max_error, (src_meta.get("recipe") or {}).get("smooth"))
    return {"scales": scales, "qparams": qparams, "attention": attn, "head": details["head"], "fp32": fp32,
            "extra": extra}
