"""Text sources for calibration and evaluation: hub datasets, local .txt/.jsonl files, or the model itself."""

import json
import os
from pathlib import Path

import numpy as np
import torch

from . import hub
from .errors import UserError

HUB_SOURCES = ("wikitext2", "c4")
SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def check_source(source, allow_self: bool = False) -> None:
    """Fail fast (before loading a model) on a data source that cannot work."""
    source = str(source)
    if source in HUB_SOURCES:
        hub.require_hub(f"'{source}'", "pass a local .txt or .jsonl file instead")
        return
    if allow_self and source == "self":
        return
    if not Path(source).expanduser().is_file():
        extra = ", self" if allow_self else ""
        raise UserError(f"data file not found: {source} (or use one of: {', '.join(HUB_SOURCES)}{extra})")


def read_texts(source, split: str = "test") -> list[str]:
    """List of documents from a SOURCE (wikitext2 | c4 | path.txt | path.jsonl)."""
    source = str(source)
    if source in HUB_SOURCES:
        return _hub_texts(source, split)
    check_source(source)
    p = Path(source).expanduser()
    if p.suffix == ".jsonl":
        texts = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{p}:{lineno}: not a JSON object with a 'text' field") from None
        return texts
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text") from None
    # WikiText layout: one row per line, blank rows become "" (as the HF `wikitext` script yields them)
    return ["" if not line.strip() else line for line in text.split("\n")]


def _hub_texts(name, split):
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return [r.rstrip("\n") if r.strip() else "" for r in rows]
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        split = "validation" if split == "test" else split
        return load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
    except Exception as e:  # network, hub or cache errors all mean the same thing to the user
        raise UserError(f"could not load '{name}' from the Hugging Face hub ({type(e).__name__}); "
                        "pass a local .txt or .jsonl file instead") from None


def tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """Join documents with blank lines and tokenize once: the standard perplexity recipe."""
    text = "\n\n".join(texts)
    if not text.strip():
        raise UserError("the text source is empty")
    saved = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)  # silence the 'sequence too long' warning
    try:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return ids


def calibration_windows(source, tokenizer, nsamples: int, seqlen: int, seed: int, model=None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens drawn with `seed`: LongTensor [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
    if str(source) == "self":
        if model is None:
            raise UserError("calibration source 'self' needs the model")
        return self_generated(model, tokenizer, nsamples, seqlen, seed)
    ids = tokenize_stream(read_texts(source, split="train"), tokenizer)
    if ids.numel() < seqlen:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    slots = ids.numel() // seqlen
    if slots >= nsamples:
        # distinct, non-overlapping windows at a random phase
        offset = int(torch.randint(0, ids.numel() - slots * seqlen + 1, (1,), generator=g))
        starts = offset + torch.randperm(slots, generator=g)[:nsamples] * seqlen
    else:
        starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


SELF_CACHE_BUDGET = 2 * 2**30  # bytes of KV cache that `self` calibration may use at once


class _StepCounter:
    """A transformers streamer that only counts generation steps, for progress."""

    def __init__(self, bar):
        self.bar, self.started = bar, False

    def put(self, value) -> None:
        if self.started:            # the first call is the prompt
            self.bar.update(1)
        self.started = True

    def end(self) -> None:
        self.started = False


def self_batch(model, nsamples: int, seqlen: int) -> int:
    """How many samples `self` calibration generates at once: all of them when their KV cache fits
    SELF_CACHE_BUDGET (one batch is many times faster than several on a CPU)."""
    from .archs import arch_of

    _, kv, d = arch_of(model).cache_shape(model.config)
    per_sample = 2 * model.config.num_hidden_layers * kv * d * seqlen * 4   # keys and values, fp32
    return max(1, min(nsamples, SELF_CACHE_BUDGET // per_sample))


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch: int | None = None) -> torch.Tensor:
    """Calibration text the model writes itself, from random first tokens (data-free calibration)."""
    from .progress import progress

    batch = batch or self_batch(model, nsamples, seqlen)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    special = set(tokenizer.all_special_ids or [])
    out = []
    torch.manual_seed(seed)
    batches = range(0, nsamples, batch)
    with progress(len(batches) * (seqlen - 1), f"generating calibration text ({nsamples} x {seqlen} tokens, "
                                               f"batch {batch})", unit="step") as bar:
        for b in batches:
            k = min(batch, nsamples - b)
            first = torch.randint(0, vocab, (k, 1), generator=g)
            for i in range(k):
                while int(first[i]) in special:
                    first[i] = torch.randint(0, vocab, (1,), generator=g)
            seq = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=seqlen - 1,
                                 min_new_tokens=seqlen - 1, pad_token_id=tokenizer.pad_token_id,
                                 streamer=_StepCounter(bar))
            out.append(seq[:, :seqlen])
    return torch.cat(out)


def eval_windows(source, tokenizer, seqlen: int, max_segments: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens over the whole evaluation text."""
    ids = tokenize_stream(read_texts(source, split="test"), tokenizer)
    count = ids.numel() // seqlen
    if max_segments:
        count = min(count, max_segments)
    if count == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def shared_asset(*parts: str) -> Path | None:
    """Path inside ../shared/assets (benchmarks and tests); None when it is absent."""
    root = Path(os.environ.get("SPARSE_EXPORT_ASSETS", SHARED_ASSETS))
    p = root.joinpath(*parts)
    return p if p.exists() else None


def random_tokens(vocab_size: int, batch: int, seqlen: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids drawn uniformly (seeded; latency does not depend on which tokens), attention mask of ones:
    int64 [batch, seqlen] each."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seqlen), dtype=np.int64)
    return ids, np.ones_like(ids)
