"""Text generation with a KV-cache deployment folder on DeepSparse or ONNX Runtime: a session that
feeds the graph (KVSession), the token loop, and streamed text."""

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import isolate
from ..errors import EngineCrash, UserError
from ..export import kv_layout
from ..outputs import read_meta
from . import GENERATE_RUNTIMES


class KVSession:
    """One KV-cache graph on one runtime: `run(ids, processed, past) -> (logits, present)`.

    DeepSparse compiles for fixed shapes, so it gets one engine per number of fed tokens
    (the prompt length, and 1 for decode steps), each compiled on first use.
    """

    def __init__(self, folder, runtime="deepsparse", threads=None):
        folder = Path(folder)
        if not (folder / "model.onnx").is_file():
            raise UserError(f"{folder} is not a deployment folder (no model.onnx)")
        meta = read_meta(folder)
        if meta.get("kind") != "onnx-kv-cache":
            raise UserError(f"{folder} has no KV-cache graph; export it with "
                            f"`sparse-export export onnx MODEL --out DIR --kv-cache`")
        if runtime not in GENERATE_RUNTIMES:
            raise UserError(f"unknown runtime '{runtime}' (choose from {', '.join(GENERATE_RUNTIMES)})")
        c = meta["cache"]
        self.folder, self.runtime, self.threads = folder, runtime, threads
        self.max_length = int(meta["max_length"])
        self.layers, self.kv_heads, self.head_dim = c["layers"], c["kv_heads"], c["head_dim"]
        self.past_names = kv_layout.cache_names(self.layers, "past_key_values")
        self.compile_s = 0.0
        self._engines = {}
        if runtime == "onnxruntime":
            self._ort = self._load_ort()

    def _load_ort(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        t = time.perf_counter()
        sess = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.compile_s += time.perf_counter() - t
        return sess

    def engine(self, n):
        """The DeepSparse engine for n fed tokens (compiled once)."""
        if n not in self._engines:
            os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network here
            try:
                from deepsparse import Engine
            except ImportError:
                raise UserError("DeepSparse is not installed (pip install 'sparse-export[deepsparse]'); "
                                "or use --runtime onnxruntime") from None
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                path = self._fixed_shape_copy(n, Path(tmp))
                self._engines[n] = Engine(str(path), batch_size=1, num_cores=self.threads)
            self.compile_s += time.perf_counter() - t
        return self._engines[n]

    def _fixed_shape_copy(self, n, tmp):
        """model.onnx with every input dimension fixed for batch 1 and n fed tokens."""
        import onnx

        L = self.max_length
        shapes = {"input_ids": [1, n], "positions": [1, n], "attention_mask": [1, L],
                  "causal_mask": [1, 1, n, L]}
        proto = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        for inp in proto.graph.input:
            dims = shapes.get(inp.name, [1, self.kv_heads, L - n, self.head_dim])
            for d, v in zip(inp.type.tensor_type.shape.dim, dims):
                d.dim_value = v
        for f in self.folder.glob("model.onnx.data*"):  # external weights stay where they are
            os.symlink(f.resolve(), tmp / f.name)
        onnx.save(proto, str(tmp / "model.onnx"))
        return tmp / "model.onnx"

    def empty_cache(self, n):
        return kv_layout.empty_cache(self.layers, 1, self.kv_heads, self.max_length - n, self.head_dim)

    def run(self, ids, processed, present=None):
        """Feed ids [1, n] after `processed` cached tokens; `present` is the previous call's cache."""
        n = len(ids[0])
        feed = kv_layout.step_feed(ids, processed, self.max_length)
        slots = self.max_length - n
        past = self.empty_cache(n) if present is None else kv_layout.keep_last(present, slots)
        if self.runtime == "onnxruntime":
            out = self._ort.run(None, {**feed, **dict(zip(self.past_names, past))})
        else:
            out = self.engine(n).run([feed[k] for k in kv_layout.KV_INPUTS] + past, val_inp=False)
        return out[0], out[1:]


def load_tokenizer(folder) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(folder))


def eos_ids(folder, tokenizer) -> set[int]:
    """End-of-sequence ids as transformers' generate() would use them."""
    import json

    ids = None
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = json.loads((Path(folder) / "config.json").read_text()).get("eos_token_id")
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


def pick_token(logits: np.ndarray, temperature: float | None = None, rng: np.random.Generator | None = None) -> int:
    """Argmax, or a draw from softmax(logits / temperature)."""
    if not temperature:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate_ids(session: KVSession, prompt_ids: list[int], max_new_tokens: int = 64, eos=(),
                 temperature: float | None = None, seed: int = 0,
                 on_token: Callable | None = None) -> tuple[list[int], dict]:
    """Generate after prompt_ids. Returns (new ids, stats); on_token(id) is called as each appears."""
    n, L = len(prompt_ids), session.max_length
    if n == 0:
        raise UserError("the prompt is empty")
    if n > L:
        raise UserError(f"the prompt is {n} tokens, longer than the exported --max-length {L}; "
                        f"shorten it or re-export with a larger --max-length")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    logits, cache = session.run([list(prompt_ids)], 0)
    ttft = time.perf_counter() - t0
    new, processed, reason = [], n, "max_new_tokens"
    t1 = time.perf_counter()
    while len(new) < max_new_tokens:
        tok = pick_token(logits[0, -1], temperature, rng)
        new.append(tok)
        if on_token:
            on_token(tok)
        if tok in eos:
            reason = "eos"
            break
        if len(new) == max_new_tokens:
            break
        if processed == L:
            reason = "max_length"
            break
        logits, cache = session.run([[tok]], processed, cache)
        processed += 1
    decode_s = time.perf_counter() - t1
    steps = len(new) - 1  # decode steps: every token after the first
    return new, {"prompt_tokens": n, "new_tokens": len(new), "finish_reason": reason,
                 "ttft_s": ttft, "decode_s": decode_s,
                 "decode_tokens_per_s": steps / decode_s if steps and decode_s > 0 else None}


class TextStream:
    """Turns generated ids into text pieces as they arrive (no half characters)."""

    def __init__(self, tokenizer, prompt_ids):
        self.tok, self.prompt = tokenizer, list(prompt_ids)
        self.base = tokenizer.decode(self.prompt, skip_special_tokens=True)
        self.ids, self.done = [], 0

    def push(self, tok):
        self.ids.append(tok)
        text = self.tok.decode(self.prompt + self.ids, skip_special_tokens=True)[len(self.base):]
        if text.endswith("\ufffd"):
            return ""
        piece, self.done = text[self.done:], len(text)
        return piece


def text_sink(tokenizer, prompt_ids, write: Callable | None = None) -> tuple[Callable, list]:
    """(on_token, pieces): on_token(id) turns each generated id into text (TextStream), keeps the piece in
    `pieces` and passes it to write(piece) when given."""
    stream, pieces = TextStream(tokenizer, prompt_ids), []

    def on_token(tok):
        piece = stream.push(tok)
        pieces.append(piece)
        if write and piece:
            write(piece)
    return on_token, pieces


def generate_text(folder, prompt: str, max_new_tokens: int = 64, runtime: str = "deepsparse",
                  temperature: float | None = None, seed: int = 0, threads: int | None = None,
                  write: Callable | None = None) -> tuple[str, dict]:
    """Generate text from a deployment folder; write(piece) streams it. Returns (text, stats)."""
    session = KVSession(folder, runtime, threads)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenizer(prompt)["input_ids"]
    if len(prompt_ids) > session.max_length:  # fail before compiling anything
        raise UserError(f"the prompt is {len(prompt_ids)} tokens, longer than the exported --max-length "
                        f"{session.max_length}; shorten it or re-export with a larger --max-length")
    on_token, pieces = text_sink(tokenizer, prompt_ids, write)

    if runtime == "deepsparse":  # compile both shapes before timing
        session.engine(len(prompt_ids))
        session.engine(1)
    ids, stats = generate_ids(session, prompt_ids, max_new_tokens, eos_ids(folder, tokenizer),
                              temperature, seed, on_token)
    stats.update(runtime=runtime, load_s=session.compile_s, ids=ids)
    return "".join(pieces), stats


GENERATE_CRASH_HINT = ("DeepSparse 1.8 does this on KV-cache graphs of some small models with more than one core; "
              "try --runtime onnxruntime")


def generate_text_child(folder: str, prompt: str, max_new_tokens: int, runtime: str, temperature, seed: int,
                        threads) -> dict:
    """generate_text writing its text to standard output (what isolate.call runs in the child). Returns the
    stats (JSON)."""
    import sys

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    _, stats = generate_text(folder, prompt, max_new_tokens, runtime, temperature, seed, threads, write)
    return stats


def generate_text_isolated(folder, prompt: str, max_new_tokens: int = 64, runtime: str = "deepsparse",
                           temperature: float | None = None, seed: int = 0, threads: int | None = None,
                           log: Callable = print) -> dict:
    """generate_text with the engine in a child process that writes the text to this standard output: a
    DeepSparse crash is retried once on one thread, and a second crash is one EngineCrash line, not the
    engine's stack dump. Returns the stats."""
    args = dict(folder=str(folder), prompt=prompt, max_new_tokens=max_new_tokens, runtime=runtime,
                temperature=temperature, seed=seed, threads=threads)
    run = (lambda a: isolate.call("sparse_export.runtimes.generate:generate_text_child", a,
                                  f"{runtime} generating with {folder}", GENERATE_CRASH_HINT, stdout=True))
    try:
        return run(args)
    except EngineCrash as e:
        if threads == 1:
            raise
        log(f"warning: {e}; retrying with one thread")
    try:
        stats = run({**args, "threads": 1})
    except EngineCrash as e:
        raise EngineCrash(f"{e} (it crashed with {threads or 'all'} threads, then again with one)") from None
    stats["note"] = "rerun with one thread after a crash"
    return stats
