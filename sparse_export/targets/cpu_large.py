"""How `prune-and-export --target cpu` runs a model: in memory, or streamed when it is too large.

Decided once, before any work, with the rules the steps use on their own: the export streams when
`onnx_stream.choose_stream` says so (IN_MEMORY_FACTOR x the float32 weights past --memory-budget, or
--stream); the prune streams when `jobs.prune(stream=None)` says so. A streamed export means the model
is not held whole anywhere, so the steps that need a whole-model torch forward are left out
(`SKIPPED_WHEN_STREAMED`). The fp32 graphs are left out with --skip-fp32, or on their own when they
would not fit (then INT8 must be asked for).
"""

import os
from dataclasses import dataclass, field

from .. import archs, models
from ..errors import UserError
from ..export.onnx_stream import CHECK_FACTOR, EXPORT_BUDGET, IN_MEMORY_FACTOR, choose_stream, fp32_weight_bytes
from ..export.onnx_stream import local_folder
from .options import CpuOptions

# the one report line for what the streamed path leaves out, and why
SKIPPED_WHEN_STREAMED = (
    "torch reference outputs of the whole model, the Accuracy section (distribution shift against dense) and "
    "the greedy completions are skipped: each needs a whole-model torch forward, and this model takes the "
    "streamed path; engine outputs are checked by each streamed export against torch run layer by layer "
    "(see Correctness)")
WHOLE_MODEL_RUNTIMES = ("torch",)   # runtimes that load the whole model in torch
FP32_GRAPHS = 2                     # fp32 graphs one runtime holds at once (dense and sparse, timed interleaved)


@dataclass
class CpuPlan:
    """What the run does: streamed or not, which runtimes, whether the fp32 graphs are made."""

    streamed: bool                           # the export streams: the large-model path
    budget: int                              # bytes (--memory-budget)
    folder: str | None = None                # the local safetensors folder (None: hub id, .gguf, ...)
    runtimes: list = field(default_factory=list)
    skip_fp32: str | None = None             # why the fp32 graphs are left out (None: they are made)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The plan as report.json records it."""
        return {"streamed": self.streamed, "memory_budget_gib": self.budget / 2**30,
                "skip_fp32": self.skip_fp32, "notes": list(self.notes),
                "skipped": SKIPPED_WHEN_STREAMED if self.streamed else None}


def machine_ram() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fp32_misfit(folder, streamed: bool, budget: int) -> str | None:
    """Why the fp32 graphs of the safetensors folder would not fit (None: they fit): the in-memory export
    (IN_MEMORY_FACTOR x the float32 weights) past the budget, or an engine holding the dense and sparse
    graphs for the interleaved benchmark (FP32_GRAPHS x CHECK_FACTOR x the float32 weights) past this
    machine's RAM."""
    fp32 = fp32_weight_bytes(folder)
    gib = 2**30
    if not streamed and IN_MEMORY_FACTOR * fp32 > budget:
        return (f"its in-memory export needs about {IN_MEMORY_FACTOR * fp32 / gib:.1f} GiB "
                f"({IN_MEMORY_FACTOR:g} x {fp32 / gib:.1f} GiB of float32 weights), over --memory-budget "
                f"{budget / gib:g} GiB")
    ram, need = machine_ram(), FP32_GRAPHS * CHECK_FACTOR * fp32
    if need > ram:
        return (f"the benchmark holds the dense and sparse graphs side by side, about {need / gib:.1f} GiB "
                f"({FP32_GRAPHS} x {CHECK_FACTOR:g} x {fp32 / gib:.1f} GiB of float32 weights), over this "
                f"machine's {ram / gib:.1f} GiB of RAM")
    return None


def plan_cpu_run(model: str, opts: CpuOptions, runtimes: list[str]) -> CpuPlan:
    """The plan for MODEL with `opts` (validated) and the runtimes check_inputs chose. One-line UserError
    for what cannot run: a whole-model runtime or option on the streamed path, fp32 graphs that do not fit
    without --int8."""
    budget = EXPORT_BUDGET if opts.memory_budget is None else int(opts.memory_budget * 2**30)
    streamed = choose_stream(model, opts.stream, budget)
    folder = local_folder(model)
    plan = CpuPlan(streamed, budget, str(folder) if folder else None, list(runtimes))
    if streamed:
        _check_streamable(model, opts, folder)
        whole = [r for r in runtimes if r in WHOLE_MODEL_RUNTIMES]
        if whole and opts.runtimes:
            raise UserError(f"--runtime {whole[0]} runs the whole model in torch; this model takes the streamed "
                            f"path (it would not fit): leave it out, or pass --no-stream")
        if whole:
            plan.runtimes = [r for r in runtimes if r not in WHOLE_MODEL_RUNTIMES]
            plan.notes.append(f"runtime {', '.join(whole)} left out: it runs the whole model in torch")
        if not plan.runtimes:
            raise UserError("no runtime left to benchmark on the streamed path (install onnxruntime or deepsparse)")
    if opts.skip_fp32:
        plan.skip_fp32 = "--skip-fp32"
    elif folder is not None:
        why = fp32_misfit(folder, streamed, budget)
        if why and not opts.int8:
            raise UserError(f"the fp32 ONNX graphs of {model} would not fit: {why}; pass --int8 --skip-fp32 "
                            f"to export and benchmark the INT8 graph only")
        if why:
            plan.skip_fp32 = f"the fp32 graphs would not fit: {why}"
    return plan


def _check_streamable(model: str, opts: CpuOptions, folder) -> None:
    """What the streamed path cannot do, in one line before any work."""
    if folder is None:
        raise UserError(f"--stream needs a local safetensors model folder; {model} loads in memory "
                        "(use --no-stream)")
    if opts.int8 and str(opts.recipe.calib) == "self":
        raise UserError("--calib self needs the whole model in memory (the model writes its own text); pass a "
                        "text source (e.g. --calib c4) or --no-stream")
    if opts.int8_max_error is not None:
        raise UserError("--int8-max-error is not available on the streamed path (its calibration sees one layer "
                        "at a time); leave it out or pass --no-stream")


def kv_supported(folder) -> str | None:
    """Why the KV-cache export does not take the folder's architecture (None: it does)."""
    name = models.read_config(folder).get("model_type")
    if name in archs.KV_CACHE:
        return None
    return f"the KV-cache export does not support architecture '{name}' (supported: {', '.join(archs.KV_CACHE)})"
