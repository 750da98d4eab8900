"""Perplexity of a deployment folder measured by running its ONNX graph (the INT8 graph's own accuracy,
not a fake-quantized torch model's).

Same text, windows and score as evaluate.perplexity: the evaluation text tokenized once by the folder's
tokenizer and cut into non-overlapping windows of `seqlen` tokens (data.eval_windows), each window run
as one [1, seqlen] batch, the mean next-token negative log-likelihood over every scored position. The
graph must return every position's logits (exported with logits="all").
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..errors import UserError
from ..outputs import Timer, read_meta
from ..progress import progress as progress_bar
from ..runtimes import get_runtime


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of logits [1, seqlen, vocab] for token ids [1, seqlen]."""
    lg = torch.from_numpy(np.ascontiguousarray(logits[0, :-1])).float()
    return float(F.cross_entropy(lg, torch.from_numpy(ids[0, 1:]), reduction="sum"))


def graph_perplexity(deploy_dir, source, seqlen: int = 2048, max_segments: int | None = None,
                     runtime: str = "onnxruntime", threads: int | None = None, progress: bool = True) -> dict:
    """Perplexity of the deployment folder's graph on SOURCE (run by `runtime`). Returns a result dict
    shaped like evaluate.evaluate's."""
    from transformers import AutoTokenizer

    meta = read_meta(deploy_dir)
    if meta.get("kind") != "deployment" or meta.get("logits") != "all":
        raise UserError(f"{deploy_dir}: graph perplexity needs a deployment folder exported with logits=all "
                        f"(this one: {meta.get('kind')}, logits={meta.get('logits')})")
    data.check_source(source)
    tokenizer = AutoTokenizer.from_pretrained(deploy_dir)
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments).numpy()
    rt = get_runtime(runtime)(deploy_dir, batch=1, seqlen=seqlen, threads=threads, logits="all")
    total, count = 0.0, 0
    try:
        with Timer() as t, progress_bar(len(windows), f"perplexity ({runtime} graph)", unit="window",
                                        enabled=progress) as bar:
            for w in windows:
                ids = w[None]
                total += window_nll(rt.run(ids, np.ones_like(ids)), ids)
                count += ids.shape[1] - 1
                bar.update(1)
    finally:
        rt.close()
    mean = total / count
    return {"model": str(deploy_dir), "data": str(source), "seqlen": seqlen, "windows": len(windows),
            "tokens": count, "perplexity": math.exp(mean), "nll": mean, "runtime": runtime,
            "eval_wall_s": t.wall, "eval_cpu_s": t.cpu, "load_s": rt.load_s}
