"""Exported graphs checked against torch: run the graph on ONNX Runtime and compare its output with
what the model in memory computes for the same tokens. Every exporter calls this on what it wrote
and refuses (one line) past the tolerance; the measured difference is recorded in the deployment's
sparse_export.json under "validation".
"""

import copy
from typing import Any, Callable

import numpy as np
import torch

from ..data import random_tokens
from ..errors import UserError
from .graph import ExportModule
from .kv_layout import KV_INPUTS, cache_names, cache_spec, empty_cache, keep_last, step_feed

# Largest |logit - torch logit| accepted from an ONNX engine. Measured on SmolLM2-135M, 1x400 tokens
# of WikiText-2 (last-token logits, max |logit| 16.7): ONNX Runtime 2.8e-5, DeepSparse 3.6e-5.
LOGITS_TOLERANCE = 1e-3
# The int8 graph against the torch model with the same integer weights and fake-quantized Linear
# inputs: tiny models agree to ~1e-7, but on a real model one activation that lands on the other side
# of a rounding step (from fp32 differences of 1e-6 in attention) shifts the next layer's inputs across
# many more, so engine and torch end up differing by about as much as quantization itself moves the
# logits (SmolLM2-135M, 1x400 tokens: max |ORT - torch| 2.9-4.6 and DeepSparse 2.4-3.3, while the
# fake-quant model differs from the same weights with fp32 activations by 2.5-5.9). Accepted: at most
# INT8_NOISE_FACTOR times that quantization effect; wrong scales or a broken graph give far more.
INT8_NOISE_FACTOR = 2.0
# A model whose weights carry large factors (SmoothQuant's --smooth folds activation outliers into them:
# SmolLM2 at alpha 0.5 has |W| up to 136 instead of 9) rounds more in fp32: torch's own fp32 logits
# then sit ~1e-3 from the exact (fp64) ones, and an engine that sums in another order lands ~2e-3 from
# torch. Past LOGITS_TOLERANCE, the check measures that rounding on the same tokens (torch fp32 against
# the model in fp64) and accepts up to FP32_NOISE_FACTOR times it; a wrong graph is off by far more.
FP32_NOISE_FACTOR = 4.0
# What an export checks itself on: a short batch of random tokens (seeded).
CHECK_BATCH, CHECK_TOKENS = 1, 16


def reference_output(model, logits: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What torch computes for a plain graph's output, from the model in memory."""
    with torch.inference_mode():
        return ExportModule(model, logits).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()


def int8_tolerance(int8_reference: np.ndarray, fp32_reference: np.ndarray) -> float:
    """Tolerance for an int8 graph: INT8_NOISE_FACTOR x how far quantizing activations moves torch."""
    return max(LOGITS_TOLERANCE, INT8_NOISE_FACTOR * float(np.abs(int8_reference - fp32_reference).max()))


def compare(got: np.ndarray, reference: np.ndarray, tolerance: float, what: str) -> dict:
    """{max_abs_diff, max_abs_output, tolerance}; UserError when the difference passes the tolerance."""
    diff = float(np.abs(got.astype(np.float32) - reference).max())
    if not diff <= tolerance:
        raise UserError(f"{what} disagrees with torch: max |difference| {diff:.2e} > tolerance {tolerance:.0e}")
    return {"max_abs_diff": diff, "max_abs_output": float(np.abs(reference).max()), "tolerance": tolerance}


def compare_fp32(got: np.ndarray, reference: np.ndarray, model, output_of: Callable, tolerance: float,
                 what: str) -> dict:
    """compare(); past `tolerance`, widen it to FP32_NOISE_FACTOR x the model's own fp32 rounding:
    max |reference - output_of(model in fp64)| (a float64 copy of the model, made only then)."""
    try:
        return compare(got, reference, tolerance, what)
    except UserError:
        noise = fp32_noise(model, output_of, reference)
        return {**compare(got, reference, max(tolerance, FP32_NOISE_FACTOR * noise), what), "fp32_noise": noise}


def fp32_noise(model, output_of: Callable, reference: np.ndarray) -> float:
    """max |reference - output_of(a float64 copy of model)|: how far the model's fp32 output is from exact."""
    exact = output_of(copy.deepcopy(model).double())
    return float(np.abs(reference.astype(np.float64) - exact).max())


def fp32_tolerance(model, logits: str, ids: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> float:
    """The tolerance for engines on `model`'s fp32 graph over these inputs: LOGITS_TOLERANCE, or
    FP32_NOISE_FACTOR x torch's own fp32 rounding there when that is larger (see compare_fp32)."""
    noise = fp32_noise(model, lambda m: _output64(m, logits, ids, mask), reference)
    return max(LOGITS_TOLERANCE, FP32_NOISE_FACTOR * noise)


def agreement(rows: list[dict], reference: dict, tolerance: float = LOGITS_TOLERANCE) -> list[dict]:
    """Max |output - torch| per benchmark row ({"model", "runtime", "output"}). Raises past `tolerance`."""
    return [{"model": r["model"], "runtime": r["runtime"],
             **compare(r["output"], reference[r["model"]], tolerance, f"{r['runtime']} on the {r['model']} model")}
            for r in rows]


def onnxruntime_session(onnx_file) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])


def validate_plain(model, onnx_file, logits: str, reference: np.ndarray | None = None,
                   tolerance: float = LOGITS_TOLERANCE, inputs=None) -> dict:
    """Run a plain graph (input_ids, attention_mask) on ONNX Runtime against torch on random tokens.

    reference: torch's output for `inputs` when the caller has it (e.g. the fake-quantized model's).
    """
    ids, mask = inputs if inputs is not None else random_tokens(model.config.vocab_size, CHECK_BATCH, CHECK_TOKENS)
    own = reference is None   # torch's fp32 output of this model: its fp32 rounding may widen the tolerance
    if own:
        reference = reference_output(model, logits, ids, mask)
    got = onnxruntime_session(onnx_file).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    what = "the exported graph on ONNX Runtime"
    result = (compare_fp32(got, reference, model, lambda m: _output64(m, logits, ids, mask), tolerance, what)
              if own else compare(got, reference, tolerance, what))
    return {"runtime": "onnxruntime", "inputs": f"{ids.shape[0]} x {ids.shape[1]} random tokens (seed 0)", **result}


def _output64(model, logits: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return ExportModule(model, logits).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).double().numpy()


def validate_kv(model, onnx_file, max_length: int, tolerance: float = LOGITS_TOLERANCE,
                qparams: dict | None = None) -> dict:
    """Run a KV-cache graph on ONNX Runtime: a prompt with an empty cache, then one decode step with the
    cache it returned; both against the full-sequence torch logits of the same tokens. qparams (an INT8
    KV-cache graph's Linear input qparams): the reference is the model with those inputs fake-quantized
    (int8_calib.fake_int8) and the tolerance int8_tolerance."""
    n = max(1, min(CHECK_TOKENS, max_length - 1))
    ids = random_tokens(model.config.vocab_size, 1, n + 1)[0]

    def logits_of(m):
        with torch.inference_mode():
            return m(input_ids=torch.from_numpy(ids), use_cache=False).logits.double().numpy()

    ref = logits_of(model).astype(np.float32)
    got = kv_graph_logits(onnx_file, ids, *cache_spec(model), max_length)
    if qparams is not None:
        from .int8_calib import fake_int8

        with fake_int8(model, qparams):
            fake = logits_of(model).astype(np.float32)
        return {"runtime": "onnxruntime", "inputs": f"{n} random prompt tokens (seed 0) + 1 decode step",
                "reference": "torch with the graph's integer weights and fake-quantized Linear inputs",
                **compare(got, fake, int8_tolerance(fake, ref), "the exported INT8 KV-cache graph on ONNX Runtime")}
    return {"runtime": "onnxruntime", "inputs": f"{n} random prompt tokens (seed 0) + 1 decode step",
            **compare_fp32(got, ref, model, logits_of, tolerance, "the exported KV-cache graph on ONNX Runtime")}


def kv_graph_logits(onnx_file, ids: np.ndarray, layers: int, kv: int, d: int, max_length: int) -> np.ndarray:
    """A KV-cache graph on ONNX Runtime: ids[:, :-1] as a prompt with an empty cache, then the last id as one
    decode step with the cache the prompt returned. Returns the logits of both, concatenated on positions."""
    n = ids.shape[1] - 1
    past_names = cache_names(layers, "past_key_values")
    session = onnxruntime_session(onnx_file)

    def step(tokens, processed, past):
        feed = step_feed(tokens, processed, max_length)
        out = session.run(None, {**{k: feed[k] for k in KV_INPUTS}, **dict(zip(past_names, past))})
        return out[0], out[1:]

    prompt, cache = step(ids[:, :n], 0, empty_cache(layers, 1, kv, max_length - n, d))
    decode, _ = step(ids[:, n:], n, keep_last(cache, max_length - 1))
    return np.concatenate([prompt, decode], axis=1)
