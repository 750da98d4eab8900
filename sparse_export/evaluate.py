"""Perplexity: exp of the mean next-token NLL over non-overlapping windows."""

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def perplexity(model, windows, batch=1, progress=True):
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
