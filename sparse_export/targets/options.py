"""What `prune-and-export` takes, one typed object per target, with every default in one place.

The CLI passes only what the user set (`build_options(target, **given)`); an option the chosen
target does not use is a one-line error, never silently dropped.
"""

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import UserError
from ..pruning.recipe import Recipe, parse_pattern

# why an option is refused by a target, where the generic "applies to the X target only" says too little
_REFUSAL_HINTS = {
    ("gpu", "int8"): "--int8 is for the cpu target (int8 matmuls in DeepSparse / ONNX Runtime); "
                     "the gpu target writes 2:4 fp16 checkpoints",
    ("gpu", "sparsity"): "--sparsity applies to the cpu target only; the gpu target prunes n:m (--pattern, "
                         "default 2:4)",
}


RECOVER_METHODS = ("blockwise", "distill")
DISTILL_STEPS, DISTILL_LR = 200, 1e-4   # --recover distill defaults in prune-and-export


@dataclass
class RecoverOptions:
    """--recover and its options (both targets): block-wise inside the prune, or distillation after it.
    A target's options inherit these, and need `recipe` and `eval_data` beside them."""

    recover: str | None = None            # blockwise (each layer inside the prune) | distill (whole model after it)
    recover_lr: float | None = None       # both (None: the method's default: blockwise 3e-4, distill DISTILL_LR)
    recover_epochs: int | None = None     # blockwise options (None: BlockwiseOptions' defaults)
    recover_batch: int | None = None
    recover_target: str | None = None
    recover_data: str | None = None       # distill: training text (default: the calibration source)
    recover_steps: int | None = None      # distill: optimizer steps (None: DISTILL_STEPS)

    def validate_recover(self) -> None:
        if self.recover == "none":
            self.recover = None
        if self.recover not in (None, *RECOVER_METHODS):
            raise UserError(f"unknown --recover '{self.recover}' (choose from none, {', '.join(RECOVER_METHODS)})")
        for flag, value in (("data", self.recover_data), ("steps", self.recover_steps)):
            if value is not None and self.recover != "distill":
                raise UserError(f"--recover-{flag} applies to --recover distill only")
        trains_on = self.recover_data or self.recipe.calib
        if self.recover == "distill" and self.eval_data is not None and trains_on == self.eval_data:
            raise UserError("--recover would train on the --eval-data text; pass another --recover-data")
        if self.recover == "distill" and ((self.recover_steps is not None and self.recover_steps < 1)
                                          or (self.recover_lr is not None and not self.recover_lr > 0)):
            raise UserError("--recover-steps must be >= 1 and --recover-lr > 0")

    def recovery_hook(self):
        """The prune's after_layer hook for --recover (None: no recovery)."""
        from ..recovery.blockwise import make_hook

        if self.recover == "distill":      # after the prune, not inside it: the block-wise options do not apply
            extra = [f for f in ("epochs", "batch", "target") if getattr(self, f"recover_{f}") is not None]
            if extra:
                raise UserError(f"--recover-{extra[0]} applies to --recover blockwise only")
            return None
        return make_hook(self.recover, self.recipe, epochs=self.recover_epochs, lr=self.recover_lr,
                         batch=self.recover_batch, target=self.recover_target)

    def distill_settings(self) -> tuple[str, int, float]:
        """--recover distill's (training source, steps, learning rate), defaults filled in."""
        return (self.recover_data or self.recipe.calib, self.recover_steps or DISTILL_STEPS,
                self.recover_lr or DISTILL_LR)


@dataclass
class CpuOptions(RecoverOptions):
    """prune -> dense/sparse ONNX (+ int8, + KV-cache graphs) -> verify -> benchmark -> report."""

    recipe: Recipe = field(default_factory=Recipe)
    eval_data: str | None = None          # text for perplexity before/after (and the correctness inputs)
    eval_seqlen: int = 2048
    max_segments: int | None = None
    runtimes: list[str] | None = None     # None: every installed CPU engine
    bench_batch: int = 1
    bench_seqlen: int = 400
    warmup: int = 3
    iterations: int = 20
    logits: str = "last"
    threads: int | None = None
    force: bool = False
    int8: bool = False                    # also prune onto the int8 grid and export onnx-int8/
    fp32_attention: bool = False          # with int8: attention score matmuls stay fp32
    int8_max_error: float | None = None   # with int8: keep fp32 the Linear layers int8 inputs hurt more than this
    generate: bool = True                 # also export KV-cache graphs and benchmark generation
    prompt_tokens: int = 256
    new_tokens: int = 128
    stream: bool | None = None            # prune and export layer by layer (None: each step's own rule decides)
    memory_budget: float | None = None    # GiB the in-memory export may use (None: onnx_stream.EXPORT_BUDGET)
    skip_fp32: bool = False               # with int8: export and benchmark only the int8 graph

    def validate(self) -> "CpuOptions":
        if self.fp32_attention and not self.int8:
            raise UserError("--fp32-attention applies to --int8 only")
        if self.int8_max_error is not None:
            if not self.int8:
                raise UserError("--int8-max-error applies to --int8 only")
            if not self.int8_max_error > 0:
                raise UserError(f"--int8-max-error must be > 0 (a relative squared error, e.g. 0.003), "
                                f"got {self.int8_max_error}")
        if self.skip_fp32 and not self.int8:
            raise UserError("--skip-fp32 leaves only the INT8 graph: it needs --int8")
        self.validate_recover()
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise UserError(f"--memory-budget must be > 0 GiB, got {self.memory_budget}")
        if self.int8:
            if self.recipe.wbits not in (None, 8):
                raise UserError(f"--int8 prunes onto the 8-bit grid; --wbits {self.recipe.wbits} contradicts it")
            self.recipe = replace(self.recipe, wbits=8)
        self.recipe.validate()
        self.recovery_hook()                      # bad --recover values: one line now, not after the export
        if self.generate and min(self.prompt_tokens, self.new_tokens - 1) < 1:
            raise UserError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
        if min(self.bench_batch, self.bench_seqlen, self.iterations) < 1 or self.warmup < 0:
            raise UserError("--bench-batch, --bench-seqlen and --iterations must be >= 1, --warmup >= 0")
        return self


@dataclass
class GpuOptions(RecoverOptions):
    """prune n:m -> compressed-tensors checkpoint -> verify (round trip, 2:4 counted) -> benchmark -> report."""

    recipe: Recipe = field(default_factory=lambda: Recipe(pattern="2:4"))
    eval_data: str | None = None
    eval_seqlen: int = 2048
    max_segments: int | None = None
    bench_batch: int = 1
    bench_seqlen: int = 512
    warmup: int = 3
    iterations: int = 20
    threads: int | None = None
    force: bool = False

    def validate(self) -> "GpuOptions":
        n, m = parse_pattern(self.recipe.pattern)
        if m != 4 or n < 2:
            raise UserError(f"the GPU target needs a pattern with at least 2 zeros in every 4 (2:4), "
                            f"not {self.recipe.pattern}")
        self.recipe.validate()
        self.validate_recover()
        self.recovery_hook()
        if min(self.bench_batch, self.bench_seqlen, self.iterations) < 1 or self.warmup < 0:
            raise UserError("--bench-batch, --bench-seqlen and --iterations must be >= 1, --warmup >= 0")
        return self


TARGETS = {"cpu": CpuOptions, "gpu": GpuOptions}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))
# recipe fields a target fixes itself: the gpu target's sparsity is its n:m pattern
_NOT_TAKEN = {"gpu": ("sparsity",)}


def option_names(target: str) -> set[str]:
    """Every option name a target takes (its own fields and the recipe's)."""
    own = {f.name for f in fields(TARGETS[target])} - {"recipe"}
    return own | (set(RECIPE_FIELDS) - set(_NOT_TAKEN.get(target, ())))


_FLAGS = {"runtimes": "--runtime"}  # CLI flags whose name differs from the field


def flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def build_options(target: str, **given) -> CpuOptions | GpuOptions:
    """The validated options of `target` from the options the user set (None: not set, default applies)."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    given = {k: v for k, v in given.items() if v is not None}
    takes = option_names(target)
    for name in given:
        if name not in takes:
            other = next((t for t in TARGETS if t != target and name in option_names(t)), None)
            raise UserError(_REFUSAL_HINTS.get((target, name))
                            or f"{flag(name)} applies to the {other or 'other'} target only")
    cls = TARGETS[target]
    recipe = replace(cls().recipe, **{k: v for k, v in given.items() if k in RECIPE_FIELDS})
    own = {k: v for k, v in given.items() if k not in RECIPE_FIELDS}
    return cls(recipe=recipe, **own).validate()


def default(target: str, name: str) -> Any:
    """The default of an option for `target` (for help texts)."""
    opts = TARGETS[target]()
    return getattr(opts.recipe, name) if name in RECIPE_FIELDS else getattr(opts, name)
