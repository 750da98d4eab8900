"""Perplexity (exp of the mean next-token NLL over non-overlapping windows) and the `eval` job."""

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data, models
from .outputs import Timer


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 1, progress: bool = True) -> tuple[float, float, int]:
    """windows: LongTensor [n, seqlen]. Returns (ppl, mean nll, tokens scored)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, windows.shape[0], batch), desc="perplexity", unit="window",
                  disable=not progress):
        ids = windows[s:s + batch].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    mean = total / count
    return math.exp(mean), mean, count


def evaluate(model_spec, source="wikitext2", seqlen: int = 2048, max_segments: int | None = None, batch: int = 1,
             model=None, tokenizer=None) -> dict:
    """Perplexity of MODEL on SOURCE. Returns a result dict."""
    data.check_source(source)
    if model is None:
        model, tokenizer = models.load_model(model_spec)
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments)
    with Timer() as t:
        ppl, nll, tokens = perplexity(model, windows, batch=batch)
    return {"model": str(model_spec), "data": str(source), "seqlen": seqlen, "windows": windows.shape[0],
            "tokens": tokens, "perplexity": ppl, "nll": nll, "eval_wall_s": t.wall, "eval_cpu_s": t.cpu}
