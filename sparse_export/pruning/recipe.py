"""The recipe: everything that decides what a prune produces, validated in one place."""

import re
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from .pruners import PRUNERS, Pruner


@dataclass
class Recipe:
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None        # "n:m", or None for unstructured
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    blocksize: int = 128
    dampening: float = 0.01
    ignore: list = field(default_factory=list)
    wbits: int | None = None          # joint quantization (symmetric int grid), None = off
    per_channel: bool = True

    @property
    def pruner(self) -> Pruner:
        return PRUNERS[self.method]

    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern) if self.pattern else (0, 0)

    def validate(self) -> "Recipe":
        if self.method not in PRUNERS:
            raise UserError(f"unknown method '{self.method}' (choose from {', '.join(PRUNERS)})")
        if self.pattern:
            parse_pattern(self.pattern)
        elif not 0 <= self.sparsity < 1:
            raise UserError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.blocksize < 1 or self.dampening <= 0:
            raise UserError("--blocksize must be >= 1 and --dampening > 0")
        if self.pruner.needs_calibration and (self.nsamples < 1 or self.seqlen < 2):
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.wbits is not None and not 2 <= self.wbits <= 8:
            raise UserError("--wbits must be between 2 and 8")
        if self.wbits and not self.pruner.joint_quant:
            joint = [n for n, p in PRUNERS.items() if p.joint_quant]
            raise UserError(f"--wbits (joint quantization) needs --method {' or '.join(joint)}")
        for p in self.ignore:
            try:
                re.compile(p)
            except re.error as e:
                raise UserError(f"bad --ignore pattern {p!r}: {e}") from None
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def parse_pattern(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"malformed pattern '{text}' (expected n:m such as 2:4)")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise UserError(f"malformed pattern '{text}' (need 0 < n < m)")
    return n, mm
