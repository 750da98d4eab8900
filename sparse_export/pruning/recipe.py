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
    group_size: int | None = None     # --wbits grid: one scale per row and this many input columns; None = per row/tensor
    clip_search: bool | None = None   # group grids: each scale the best of a few clipped ranges (grid.clip_scales);
                                      # None: on with --group-size, off without
    allocation: str = "uniform"       # per-layer sparsity: uniform | owl (outlier-weighed, Yin et al. 2024)
    owl_threshold: float = 5.0        # OWL's M: a score is an outlier above M x its layer's mean score
    owl_lambda: float = 0.08          # OWL's lambda: layer sparsities span [s - lambda, s + lambda]
    alps_iters: int = 20              # ALPS: most ADMM iterations per layer
    alps_rho: float = 0.3             # ALPS: first ADMM penalty
    alps_rho_growth: float = 1.2      # ALPS: penalty multiplied by this each iteration
    alps_cg_iters: int = 5            # ALPS: conjugate-gradient refit iterations
    smooth: float | None = None       # SmoothQuant alpha: outliers into the weights first (smooth.py), None = off

    def __post_init__(self):
        if self.clip_search is None:
            self.clip_search = bool(self.group_size)

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
        self._validate_group()
        self._validate_allocation()
        if self.smooth is not None and not 0 < self.smooth <= 1:
            raise UserError(f"--smooth (SmoothQuant alpha) must be in (0, 1], got {self.smooth}")
        if self.smooth is not None and not self.pruner.needs_calibration:
            raise UserError(f"--smooth reads activations; --method {self.method} runs no calibration text")
        if self.smooth is not None and self.wbits and not self.per_channel:
            raise UserError("--smooth rescales output rows (v_proj, up_proj): with --wbits it needs --per-channel")
        if min(self.alps_iters, self.alps_cg_iters) < 1:
            raise UserError("--alps-iters and --alps-cg-iters must be >= 1")
        if self.alps_rho <= 0 or self.alps_rho_growth < 1:
            raise UserError("--alps-rho must be > 0 and --alps-rho-growth >= 1")
        for p in self.ignore:
            try:
                re.compile(p)
            except re.error as e:
                raise UserError(f"bad --ignore pattern {p!r}: {e}") from None
        return self

    def _validate_group(self) -> None:
        g = self.group_size
        if g is None:
            if self.clip_search:
                raise UserError("--clip-search chooses group scales: it needs --group-size")
            return
        if not self.wbits:
            raise UserError("--group-size sets the scales of a --wbits grid: give --wbits too")
        if g < 32 or g & (g - 1):
            raise UserError(f"--group-size must be a power of two >= 32, got {g}")
        if not self.per_channel:
            raise UserError("--group-size gives each row its own scales: it cannot go with --per-tensor")
        if self.smooth is not None:
            raise UserError("--smooth rescales the rows of a pruned grid, which group scales cannot follow: "
                            "use it without --group-size")
        if self.blocksize % g and g % self.blocksize:
            raise UserError(f"--group-size {g} and --blocksize {self.blocksize}: one must divide the other")

    def _validate_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation '{self.allocation}' (choose from {', '.join(ALLOCATIONS)})")
        if self.allocation == "uniform":
            return
        if self.pattern:
            raise UserError("--allocation owl sets a sparsity per layer; an n:m --pattern has none (use --sparsity)")
        if not self.pruner.needs_calibration:
            raise UserError(f"--allocation owl reads activations; --method {self.method} runs no calibration text")
        if self.owl_threshold <= 0 or self.owl_lambda <= 0:
            raise UserError("--owl-threshold and --owl-lambda must be > 0")
        if self.owl_lambda >= 0.5:     # layer sparsities span 2 x lambda: wider than [0, 1) cannot fit
            raise UserError(f"--owl-lambda {self.owl_lambda} is too large: layer sparsities span 2 x lambda "
                            "and must stay in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


ALLOCATIONS = ("uniform", "owl")


def parse_pattern(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"malformed pattern '{text}' (expected n:m such as 2:4)")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise UserError(f"malformed pattern '{text}' (need 0 < n < m)")
    return n, mm
