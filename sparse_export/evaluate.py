"""Perplexity (exp of the mean next-token NLL over non-overlapping windows) and the `eval` job.

A local safetensors folder of more than 2 GiB (or any with --stream) is evaluated streamed: all windows go
through one decoder layer at a time, read from the shards when its turn comes, so a model larger than RAM
can be measured."""

import math
import shutil
import tempfile

import torch
import torch.nn.functional as F

from . import data, models
from .archs import arch_of
from .checkpoints import Layout, ShardReader, check_shards, load_tensors, release, skeleton, streamable, tie_missing
from .layerwise import (ACTIVATION_BUDGET, LayerBar, activation_stores, buffers_to, capture_first_layer_inputs,
                        head_logits, layer_out, pick_device, to_device)
from .errors import UserError
from .outputs import Timer, peak_rss_gib
from .progress import progress as progress_bar


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logits = logits.float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum"))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 1, progress: bool = True) -> tuple[float, float, int]:
    """windows: LongTensor [n, seqlen]. Returns (ppl, mean nll, tokens scored)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch)
    with progress_bar(len(starts), "perplexity", unit="batch", enabled=progress) as bar:
        for s in starts:
            ids = windows[s:s + batch].to(dev)
            total += _nll(model(input_ids=ids, use_cache=False).logits, ids)
            count += ids[:, 1:].numel()
            bar.update(1)
    mean = total / count
    return math.exp(mean), mean, count


@torch.no_grad()
def stream_perplexity(folder, windows: torch.Tensor, batch: int = 1, device="cpu", offload=None,
                      activation_budget: int | None = ACTIVATION_BUDGET,
                      progress: bool = True) -> tuple[float, float, int]:
    """perplexity() of the safetensors model folder `folder`, one decoder layer at a time.

    The hidden states of all windows stay in RAM within `activation_budget` bytes, else in a temporary
    file (in `offload` when given). Each layer runs on `device`; the head runs there at the end."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    reader = ShardReader(folder)
    model = skeleton(folder, reader)
    layers = models.decoder_layers(model)
    layout = Layout(model, reader)
    hidden = arch_of(model).hidden_size(model.config)
    spill = tempfile.mkdtemp(prefix="sparse-export-eval-", dir=offload)
    try:
        src, dst = activation_stores((windows.shape[0], windows.shape[1], hidden), model.dtype, batch,
                                     activation_budget, spill)
        load_tensors(model, reader, layout.rest)
        _, kwargs = capture_first_layer_inputs(model, windows, batch, sink=src)
        release(model, layout.rest)
        returns_tuple = False
        bar = LayerBar(len(layers), "perplexity (streamed)", dev, progress)
        for i, layer in enumerate(layers):
            load_tensors(model, reader, layout.layers[i], dev)
            for c, kw in enumerate(kwargs):
                out = layer(to_device(src[c], dev), **to_device(kw, dev))
                returns_tuple = isinstance(out, (tuple, list))
                dst[c] = layer_out(out)
            release(model, layout.layers[i])
            src, dst = dst, src
            bar.step()
        bar.close()
        load_tensors(model, reader, {**layout.rest, **layout.head}, dev)
        tie_missing(model)
        head = model.get_output_embeddings()
        if head is not None and any(p.is_meta for p in head.parameters()):
            raise UserError(f"{folder}: the LM head weights are not in the shards")
        buffers_to(model, dev)
        total, count = 0.0, 0
        for c, (s, e) in enumerate(src.spans):
            ids = windows[s:e].to(dev)
            total += _nll(head_logits(model, ids, src[c].to(dev), returns_tuple), ids)
            count += ids[:, 1:].numel()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    mean = total / count
    return math.exp(mean), mean, count


def evaluate(model_spec, source="wikitext2", seqlen: int = 2048, max_segments: int | None = None, batch: int = 1,
             model=None, tokenizer=None, device="cpu", stream: bool | None = None, offload=None,
             activation_budget: int | None = ACTIVATION_BUDGET) -> dict:
    """Perplexity of MODEL on SOURCE. Returns a result dict.

    stream: layer by layer from the shards (None: when checkpoints.streamable() says so and no model is given)."""
    data.check_source(source)
    dev = pick_device(device)
    if stream is None:
        stream = model is None and streamable(model_spec)
    if stream:
        from transformers import AutoTokenizer

        kind, where = models.resolve(model_spec)
        if kind != "folder":
            raise UserError(f"--stream needs a local safetensors model folder; {model_spec} loads in memory "
                            "(use --no-stream)")
        ShardReader(where)  # bad weights: one line before the tokenizer and the text
        tokenizer = AutoTokenizer.from_pretrained(where)
    elif model is None:
        check_shards(model_spec)
        model, tokenizer = models.load_model(model_spec)
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments)
    with Timer() as t:
        if stream:
            ppl, nll, tokens = stream_perplexity(where, windows, batch, dev, offload, activation_budget)
        else:
            ppl, nll, tokens = perplexity(model.to(dev), windows, batch=batch)
    return {"model": str(model_spec), "data": str(source), "seqlen": seqlen, "windows": windows.shape[0],
            "tokens": tokens, "perplexity": ppl, "nll": nll, "eval_wall_s": t.wall, "eval_cpu_s": t.cpu,
            "streamed": bool(stream), "device": str(dev), "peak_memory_gib": peak_rss_gib()}
