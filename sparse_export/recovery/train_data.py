"""Training text for recovery: windows from any calibration source, or written by the dense teacher
(`self`). The evaluation text is refused."""

from pathlib import Path

import torch

from .. import data
from ..errors import UserError

SELF_POOL = 64  # windows the teacher writes for `self`; training cycles through them


def check_training_source(source: str, eval_data: str | None = None) -> None:
    """Fail fast on a source that cannot work or that is the evaluation text."""
    source = str(source)
    if source == "wikitext2" or Path(source).name.startswith("wiki.test"):
        raise UserError(f"{source} is evaluation text; train on another source (c4, a .txt/.jsonl, or self)")
    if eval_data and source == str(eval_data):
        raise UserError("--data is the --eval-data text; train on another source")
    data.check_source(source, allow_self=True)


def training_windows(source: str, tokenizer, count: int, seqlen: int, seed: int, teacher=None,
                     self_pool: int = SELF_POOL) -> torch.Tensor:
    """LongTensor [count, seqlen]: the windows training reads in order (drawn with `seed`).

    `self`: the teacher writes min(count, self_pool) windows, repeated in a seeded order."""
    if str(source) != "self":
        return data.calibration_windows(source, tokenizer, count, seqlen, seed)
    pool = data.calibration_windows("self", tokenizer, min(count, self_pool), seqlen, seed, model=teacher)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(pool.shape[0], generator=g) for _ in range(-(-count // pool.shape[0]))])
    return pool[order[:count]]
