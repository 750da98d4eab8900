"""Continuous batching: one thread owns the model. Between decode steps it drops finished and cancelled
sequences and prefills waiting ones that fit (slots and KV-cache budget); each step then decodes every
active sequence as one batch. Each request samples with its own seeded generator, so what it gets does
not depend on what else runs beside it."""

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..runtimes.generate import TextStream
from ..runtimes.sparse_cpu.batch import BatchSession, Slot
from ..runtimes.sparse_cpu.kernel import KernelClock
from .metrics import Metrics

# test hooks: a prompt containing $SPARSE_EXPORT_SERVE_FAULT fails inside the scheduler;
# $SPARSE_EXPORT_SERVE_STEP_DELAY seconds are slept after each decode step (keeps requests in flight)
FAULT_ENV, DELAY_ENV = "SPARSE_EXPORT_SERVE_FAULT", "SPARSE_EXPORT_SERVE_STEP_DELAY"


class QueueFull(Exception):
    pass


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Argmax when temperature is 0; else a draw from softmax(logits / T) cut to the smallest set of tokens
    whose probability reaches top_p (the draw of generate.pick_token when top_p is 1)."""
    if not temperature:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


@dataclass(eq=False)
class Request:
    """One generation. emit(event) is called from the scheduler thread with ("text", piece),
    ("done", finish_reason, usage) or ("error", status, message)."""
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prompt_text: str = ""
    ignore_eos: bool = False
    cancelled: bool = False
    # scheduler state
    slot: Slot | None = None
    reserve: int = 0
    new: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    created: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """The loop over a BatchSession (start() runs it on its own thread)."""

    def __init__(self, batch: BatchSession, tokenizer, eos: set[int], metrics: Metrics, max_queue: int = 64):
        self.batch, self.tokenizer, self.eos, self.metrics = batch, tokenizer, eos, metrics
        self.max_queue = max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = None
        self.fault = os.environ.get(FAULT_ENV)
        self.delay = float(os.environ.get(DELAY_ENV) or 0)
        self._spent = 0.0     # seconds of this loop turn counted under prefill or step

    # ---- called from the HTTP side
    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull when max_queue are already waiting for a slot (requests that a free slot
        will take at the next admission do not count)."""
        req.reserve = min(len(req.prompt_ids) + req.max_tokens - 1, self.batch.max_context)
        with self.cv:
            free = max(0, self.batch.max_batch - len(self.active))
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull()
            self.waiting.append(req)
            self.metrics.queue.set(len(self.waiting))
            self.cv.notify()

    def fits_ever(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request could ever be admitted (alone, with an empty batch)."""
        return min(prompt_tokens + max_tokens - 1, self.batch.max_context) <= self.batch.budget_tokens

    def status(self) -> dict:
        with self.cv:
            return {"active": len(self.active), "queued": len(self.waiting), "max_batch": self.batch.max_batch,
                    "kv_reserved_tokens": self.batch.reserved, "kv_budget_tokens": self.batch.budget_tokens}

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="sparse-export-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Fail what is still queued or running and end the loop."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread:
            self.thread.join(timeout)

    # ---- the loop
    def run(self) -> None:
        while True:
            with self.cv:
                while not (self.waiting or self.active or self.stopping):
                    self.cv.wait()
                if self.stopping:
                    break
            t = time.perf_counter()
            self._drop_cancelled()
            self._admit()
            if self.active:
                self._step()
            self.metrics.split.labels("scheduler").inc(max(0.0, time.perf_counter() - t - self._spent))
            self._spent = 0.0
            if self.delay and self.active:
                time.sleep(self.delay)
        for r in list(self.waiting) + self.active:
            self._fail(r, 503, "the server is shutting down")
        self.waiting.clear()

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.active if r.cancelled]:
            self._finish(r, None)

    def _admit(self) -> None:
        while True:
            with self.cv:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                if not self.waiting or not self.batch.can_admit(self.waiting[0].reserve):
                    self.metrics.queue.set(len(self.waiting))
                    return
                r = self.waiting.popleft()
                self.active.append(r)          # counted as active from here (submit sees the slot taken)
                self.metrics.queue.set(len(self.waiting))
            try:
                if self.fault and self.fault in r.prompt_text:
                    raise RuntimeError("injected fault (" + FAULT_ENV + ")")
                t = time.perf_counter()
                r.slot, logits = self.batch.prefill(r.prompt_ids, r.reserve)
                t = time.perf_counter() - t
                self.metrics.split.labels("prefill").inc(t)
                self._spent += t
                r.rng = np.random.default_rng(r.seed)
                r.stream = TextStream(self.tokenizer, r.prompt_ids)
                now = time.perf_counter()
                self.metrics.ttft.observe(now - r.created)
                r.last = now
                self._token(r, sample(logits, r.temperature, r.top_p, r.rng))
            except Exception as e:  # this request fails, the server goes on
                if r.slot is not None:
                    self.batch.release(r.slot)
                with self.cv:
                    if r in self.active:
                        self.active.remove(r)
                self._fail(r, 500, f"{type(e).__name__}: {e}")
            self.metrics.active.set(len(self.active))

    def _step(self) -> None:
        live = list(self.active)
        t = time.perf_counter()
        try:
            with KernelClock() as clock:
                logits = self.batch.step([r.slot for r in live], [r.new[-1] for r in live])
        except Exception as e:  # the whole step failed: fail its requests, keep serving
            for r in live:
                self._finish(r, None)
                self._fail(r, 500, f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        self.metrics.split.labels("step_matmul").inc(clock.seconds)
        self.metrics.split.labels("step_other").inc(max(0.0, now - t - clock.seconds))
        self._spent += now - t
        self.metrics.step.observe(now - t)
        self.metrics.occupancy.observe(len(live))
        for r, row in zip(live, logits):
            self.metrics.inter_token.observe(now - r.last)
            r.last = now
            try:
                self._token(r, sample(row, r.temperature, r.top_p, r.rng))
            except Exception as e:
                self._finish(r, None)
                self._fail(r, 500, f"{type(e).__name__}: {e}")

    def _token(self, r: Request, tok: int) -> None:
        """Record r's new token; send the text that is final; finish r when it is done."""
        r.new.append(tok)
        self.metrics.tokens.inc()
        r.text += r.stream.push(tok)
        if r.cancelled:
            return self._finish(r, None)
        reason = None
        cut = min((i for i in (r.text.find(s, max(0, r.sent - len(s))) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.text, reason = r.text[:cut], "stop"
        elif tok in self.eos and not r.ignore_eos:
            reason = "stop"
        elif len(r.new) >= r.max_tokens or r.slot.length >= r.reserve:
            reason = "length"
        # while more may come, hold back what could be the start of a stop string
        hold = 0 if reason else max((len(s) - 1 for s in r.stop), default=0)
        upto = max(r.sent, len(r.text) - hold)
        if upto > r.sent:
            r.emit(("text", r.text[r.sent:upto]))
            r.sent = upto
        if reason:
            self._finish(r, reason)

    def _finish(self, r: Request, reason: str | None) -> None:
        if r.slot is not None:
            self.batch.release(r.slot)
        with self.cv:
            if r in self.active:
                self.active.remove(r)
        self.metrics.active.set(len(self.active))
        if reason:
            usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.new),
                     "total_tokens": len(r.prompt_ids) + len(r.new)}
            r.emit(("done", reason, usage))

    def _fail(self, r: Request, status: int, message: str) -> None:
        r.emit(("error", status, message))
