"""Many sequences decoding together on sparse-cpu: slots, each with its own KV cache, inside a memory budget.

A new sequence is prefilled alone (the lean torch loop, as `generate` does); decode steps then run every
active slot as one native call (decoder.LeanDecoder.step_batch), so each Linear reads its weights once per
step for the whole batch. Each slot's logits are bit for bit what the sequence decoding alone gets.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import UserError
from .decoder import LeanCache
from .session import DecodeSession


@dataclass(eq=False)
class Slot:
    """One sequence: its cache (capacity = the tokens reserved for it) and how many tokens it holds."""
    cache: LeanCache
    reserved: int
    tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.cache.length


class BatchSession:
    """A DecodeSession serving up to max_batch sequences whose caches together stay within kv_budget bytes.

    A slot reserves prompt + new tokens up front (its cache is allocated at that size and never grows), so
    admission decides memory: can_admit(n) says whether n more tokens fit now."""

    def __init__(self, session: DecodeSession, max_batch: int = 8, max_context: int | None = None,
                 kv_budget: int | None = None):
        d = session.decoder
        if d is None or not d.native:
            raise UserError(f"{session.folder}: batched decoding needs a Llama-family model (llama, mistral, qwen2) "
                            f"with every matrix on the sparse-cpu kernels")
        self.session, self.decoder = session, d
        self.max_batch = max_batch
        self.max_context = min(max_context or session.max_length, session.max_length)
        self.bytes_per_token = 2 * len(d.layers) * d.KV * d.D * 4   # keys and values, float32
        self.kv_budget = kv_budget or self.max_batch * self.max_context * self.bytes_per_token
        if self.kv_budget < self.bytes_per_token * 2:
            raise UserError("the KV-cache budget holds fewer than two tokens")
        self.reserved = 0           # tokens reserved by live slots
        self.slots: list[Slot] = []

    @property
    def budget_tokens(self) -> int:
        return self.kv_budget // self.bytes_per_token

    def can_admit(self, tokens: int) -> bool:
        return len(self.slots) < self.max_batch and self.reserved + tokens <= self.budget_tokens

    def prefill(self, prompt_ids: list[int], reserve: int) -> tuple[Slot, np.ndarray]:
        """A new slot for prompt_ids holding up to `reserve` tokens; returns (slot, logits [vocab] of the
        prompt's last position)."""
        if not 0 < len(prompt_ids) < reserve + 1 or reserve > self.max_context:
            raise UserError(f"a slot of {reserve} tokens for a {len(prompt_ids)}-token prompt "
                            f"(context {self.max_context})")
        if not self.can_admit(reserve):
            raise UserError("no free slot or KV-cache budget for this sequence")
        d = self.decoder
        # uninitialized: only written positions are read, and pages never written are never resident, so a
        # slot reserved for a long reply costs memory as it is filled, not up front
        cache = LeanCache(len(d.layers), d.KV, d.D, capacity=1)
        cache.capacity = reserve
        cache.k = [torch.empty(1, d.KV, reserve, d.D) for _ in d.layers]
        cache.v = [torch.empty(1, d.KV, reserve, d.D) for _ in d.layers]
        slot = Slot(cache, reserve, list(prompt_ids))
        self.reserved += reserve
        self.slots.append(slot)
        try:
            logits, _ = self.session.run([list(prompt_ids)], 0, cache)
        except BaseException:
            self.release(slot)
            raise
        return slot, logits[0, -1]

    def step(self, slots: list[Slot], tokens: list[int]) -> np.ndarray:
        """Feed tokens[b] to slots[b], all in one batched step; returns logits [B, vocab]."""
        for s in slots:
            if s.length + 1 > s.reserved:
                raise UserError(f"a slot reserved for {s.reserved} tokens is full")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                logits = self.decoder.step_batch(tokens, [s.cache for s in slots])
        finally:
            torch.set_num_threads(before)
        for s, t in zip(slots, tokens):
            s.tokens.append(t)
        return logits.numpy()

    def release(self, slot: Slot) -> None:
        """Free a slot's cache and its reservation."""
        if slot in self.slots:
            self.slots.remove(slot)
            self.reserved -= slot.reserved
        slot.cache.k, slot.cache.v = [], []
        slot.cache.native = (None,)
