"""Exported graphs checked against torch: run the graph on ONNX Runtime and compare its output with
what the model in memory computes for the same tokens. Every exporter calls this on what it wrote
and refuses (one line) past the tolerance; the measured difference is recorded in the deployment's
sparse_export.json under "validation".
"""

from typing import Any

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
    if reference is None:
        reference = reference_output(model, logits, ids, mask)
    got = onnxruntime_session(onnx_file).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return {"runtime": "onnxruntime", "inputs": f"{ids.shape[0]} x {ids.shape[1]} random tokens (seed 0)",
            **compare(got, reference, tolerance, "the exported graph on ONNX Runtime")}


def validate_kv(model, onnx_file, max_length: int, tolerance: float = LOGITS_TOLERANCE) -> dict:
    """Run a KV-cache graph on ONNX Runtime: a prompt with an empty cache, then one decode step with the
    cache it returned; both against the full-sequence torch logits of the same tokens."""
    n = max(1, min(CHECK_TOKENS, max_length - 1))
    ids = random_tokens(model.config.vocab_size, 1, n + 1)[0]
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    layers, kv, d = cache_spec(model)
    past_names = cache_names(layers, "past_key_values")
    session = onnxruntime_session(onnx_file)

    def step(tokens, processed, past):
        feed = step_feed(tokens, processed, max_length)
        out = session.run(None, {**{k: feed[k] for k in KV_INPUTS}, **dict(zip(past_names, past))})
        return out[0], out[1:]

    prompt, cache = step(ids[:, :n], 0, empty_cache(layers, 1, kv, max_length - n, d))
    decode, _ = step(ids[:, n:], n, keep_last(cache, max_length - 1))
    got = np.concatenate([prompt, decode], axis=1)
    return {"runtime": "onnxruntime", "inputs": f"{n} random prompt tokens (seed 0) + 1 decode step",
            **compare(got, ref, tolerance, "the exported KV-cache graph on ONNX Runtime")}
