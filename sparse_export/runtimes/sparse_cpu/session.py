"""The sparse-cpu runtime on a model folder: a decode session for `generate` and `benchmark --mode
generate` (the interface of generate.KVSession: run(ids, processed, cache) -> (logits, cache)), the
prefill adapter for `benchmark` (base.Runtime), and streamed text generation.

Runtime names (runtimes/__init__.py):
  sparse-cpu        each matrix in the layout that reads fewer bytes: bitmask when at least
                    MASK_MIN_SPARSITY of it is zero, else dense int8 (the LM head: dense)
  sparse-cpu-dense  every matrix dense int8: the baseline the sparse layout is measured against
Both compute the same integers, so they give the same logits bit for bit.
"""

import os
import time
from collections.abc import Callable

import numpy as np
import torch

from ... import models
from ...errors import UserError
from ..base import Runtime
from ..generate import eos_ids, generate_ids, text_sink
from .decoder import LeanDecoder, lean_groups, lean_supported
from .model import Int8Linear, load_int8_model

KERNEL_OF = {"sparse-cpu": "auto", "sparse-cpu-dense": "dense"}
REFERENCES = {"fake-quant": "exact", "fake-quant-fp32": "fp32"}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class DecodeSession:
    """A model folder loaded for generation with batch 1.

    runtime: "sparse-cpu" | "sparse-cpu-dense", or "torch-fp32" (the matrices' float32 weights, torch's own
    matmuls: the fp32 baseline), and the torch references "fake-quant" (FakeQuantLinear, exact integer
    products) and "fake-quant-fp32" (dequantized float32 matmuls).
    threads: the kernel's threads (None: every core); torch itself runs the rest of the model on one
    thread (decode's attention and norms are tiny), except for torch-fp32, which gets `threads`.
    lean: the Llama family runs decoder.LeanDecoder (fused q/k/v and gate/up, preallocated cache) unless
    lean=False; other families, transformers' forward with its DynamicCache.
    stream: read a safetensors folder's matrices group by group (load_int8_model); None: for large folders.
    native: one-token steps of the lean loop run whole in C++ (decoder.LeanDecoder); False: the torch loop.
    """

    def __init__(self, folder, runtime: str = "sparse-cpu", threads: int | None = None, path: str | None = None,
                 lean: bool = True, stream: bool | None = None, native: bool = True):
        if runtime not in (*KERNEL_OF, *REFERENCES, "torch-fp32"):
            raise UserError(f"unknown runtime '{runtime}' (choose from {', '.join(KERNEL_OF)})")
        self.folder, self.runtime = folder, runtime
        self.threads = threads or default_threads()
        reference = {**REFERENCES, "torch-fp32": "torch"}.get(runtime)
        fuse = (lambda m: lean_groups(m) if lean and lean_supported(m) else None)
        t = time.perf_counter()
        self.model, self.tokenizer, self.summary = load_int8_model(
            folder, KERNEL_OF.get(runtime, "auto"), self.threads, path, reference, fuse, stream)
        self.decoder = LeanDecoder(self.model, self.summary["fused"], native) if self.summary["fused"] else None
        self.compile_s = time.perf_counter() - t
        config = self.model.config
        self.max_length = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                              or 4096)
        if self.decoder is not None and self.decoder.window:
            self.max_length = min(self.max_length, self.decoder.window)
        self.torch_threads = self.threads if runtime == "torch-fp32" else 1
        self.weight_bytes = self.summary["bytes"]

    def set_threads(self, threads: int) -> None:
        """Change the thread count (kernel modules, or torch's for torch-fp32)."""
        self.threads = threads
        if self.runtime == "torch-fp32":
            self.torch_threads = threads
        for m in [*self.model.modules(), *self.summary["fused"].values()]:
            if isinstance(m, Int8Linear):
                m.threads = threads

    def run(self, ids, processed: int, present=None) -> tuple[np.ndarray, object]:
        """Feed ids [[...]] after `processed` cached tokens; `present`: the previous call's cache (None: a new
        one). Returns (logits of the last position [1, 1, vocab] as numpy, the cache)."""
        from transformers import DynamicCache

        ids = torch.as_tensor(ids, dtype=torch.long)
        if present is None:
            present = self.decoder.new_cache() if self.decoder is not None else DynamicCache()
        if present.get_seq_length() != processed:
            raise UserError(f"the cache holds {present.get_seq_length()} tokens, not {processed}")
        if processed + ids.shape[1] > self.max_length:
            raise UserError(f"{processed + ids.shape[1]} tokens are more than the model's {self.max_length} positions")
        before = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            with torch.inference_mode():
                if self.decoder is not None:
                    return self.decoder(ids, present).float().numpy(), present
                out = self.model(input_ids=ids, cache=present, use_cache=True, logits_to_keep=1)
        finally:
            torch.set_num_threads(before)
        return out.logits.float().numpy(), out.cache


class SparseCpuRuntime(Runtime):
    """Prefill (`benchmark`, default mode) with the sparse-cpu model: the kernel handles many tokens in
    chunks of 8 per pass over each row's weights."""

    name = "sparse-cpu"
    package = "sparse-export"

    def _load(self):
        from ...export.graph import ExportModule, is_deployment

        if is_deployment(self.folder):
            raise UserError(f"the {self.name} runtime runs model folders (from `prune`), not deployment folders")
        self.session = DecodeSession(self.folder, self.name, self.threads, lean=False)
        self.module = ExportModule(self.session.model, self.logits).eval()

    def run(self, input_ids, attention_mask):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                out = self.module(torch.from_numpy(np.asarray(input_ids, np.int64)),
                                  torch.from_numpy(np.asarray(attention_mask, np.int64)))
        finally:
            torch.set_num_threads(before)
        return out.float().numpy()


class SparseCpuDenseRuntime(SparseCpuRuntime):
    name = "sparse-cpu-dense"


def generate_folder_text(folder, prompt: str, max_new_tokens: int = 64, runtime: str = "sparse-cpu",
                         temperature: float | None = None, seed: int = 0, threads: int | None = None,
                         write: Callable | None = None) -> tuple[str, dict]:
    """Generate text from a model folder on sparse-cpu; write(piece) streams it. Returns (text, stats)
    like generate.generate_text."""
    session = DecodeSession(folder, runtime, threads)
    tokenizer = session.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    on_token, pieces = text_sink(tokenizer, prompt_ids, write)

    kind, where = models.resolve(folder)
    eos = eos_ids(where, tokenizer) if kind == "folder" else {tokenizer.eos_token_id} - {None}
    ids, stats = generate_ids(session, prompt_ids, max_new_tokens, eos, temperature, seed, on_token)
    stats.update(runtime=runtime, load_s=session.compile_s, ids=ids)
    return "".join(pieces), stats
