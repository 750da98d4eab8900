"""`prune-and-export`: one pipeline per deployment target (cpu.py, gpu.py), each a sequence of named
steps taking one options object (options.py)."""

from .cpu import run_cpu_target
from .gpu import run_gpu_target
from .options import CpuOptions, GpuOptions


def prune_and_export(model: str, out, opts: CpuOptions | GpuOptions, log=print) -> dict:
    """Run the pipeline of the target `opts` belongs to. Returns the report dict."""
    if isinstance(opts, GpuOptions):
        return run_gpu_target(model, out, opts, log=log)
    return run_cpu_target(model, out, opts, log=log)
