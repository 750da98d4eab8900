"""Engine adapters behind one interface (see base.Runtime); `get_runtime(name)` picks one."""

import importlib
import importlib.util

from ..errors import UserError

# name: (adapter module, class, the module the engine needs, how to install it)
RUNTIMES = {
    "deepsparse": ("deepsparse_rt", "DeepSparseRuntime", "deepsparse", "pip install 'sparse-export[deepsparse]'"),
    "onnxruntime": ("onnxruntime_rt", "OnnxRuntime", "onnxruntime", "pip install onnxruntime"),
    "torch": ("torch_rt", "TorchRuntime", "torch", "pip install torch"),
    "torch-sparse24": ("torch_sparse24", "TorchSparse24", "torch", "pip install torch (a CUDA build)"),
    "torch-cuda": ("torch_sparse24", "TorchCudaDense", "torch", "pip install torch (a CUDA build)"),
    # our int8 kernels on model folders (sparse_cpu/session.py): bitmask where sparse, and all-dense int8
    "sparse-cpu": ("sparse_cpu.session", "SparseCpuRuntime", "torch", "pip install -e . (builds its C++ kernels)"),
    "sparse-cpu-dense": ("sparse_cpu.session", "SparseCpuDenseRuntime", "torch",
                         "pip install -e . (builds its C++ kernels)"),
}
GPU_ONLY = ("torch-sparse24", "torch-cuda")  # listed by available() only where CUDA is
CPU_RUNTIMES = ("deepsparse", "onnxruntime", "torch")      # prefill benchmark defaults
GENERATE_RUNTIMES = ("deepsparse", "onnxruntime")           # run KV-cache graphs (generate.KVSession)
FOLDER_RUNTIMES = ("sparse-cpu", "sparse-cpu-dense")      # generate from model folders (sparse_cpu.session)


def installed(name: str) -> bool:
    return name in RUNTIMES and importlib.util.find_spec(RUNTIMES[name][2]) is not None


def available() -> list[str]:
    """Names of the runtimes whose engine is installed."""
    import torch

    return [n for n in RUNTIMES if installed(n) and (n not in GPU_ONLY or torch.cuda.is_available())]


def get_runtime(name: str) -> type:
    """The adapter class for `name`; UserError when it is unknown or its engine is missing."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime '{name}' (choose from {', '.join(RUNTIMES)})")
    module, cls, needs, hint = RUNTIMES[name]
    if not installed(name):
        raise UserError(f"runtime '{name}' needs the '{needs}' package, which is not installed ({hint})")
    try:
        importlib.import_module(needs)
    except Exception as e:  # a broken install (say, a numpy it was not built for): one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"runtime '{name}': importing '{needs}' failed: {first}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
