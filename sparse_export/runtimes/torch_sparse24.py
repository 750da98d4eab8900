"""PyTorch on CUDA with 2:4 weights as semi-structured sparse tensors (cuSPARSELt or CUTLASS kernels).

`torch-cuda` runs the same checkpoint with its dense weights (cuBLAS): the baseline.
"""

import numpy as np
import torch

from ..errors import UserError

from .base import Runtime

DTYPES = ("float16", "bfloat16")
BACKENDS = ("auto", "cusparselt", "cutlass")


def require_cuda(name: str = "torch-sparse24") -> None:
    if not torch.cuda.is_available():
        raise UserError(f"the {name} runtime needs a CUDA GPU")


def pick_backend(backend: str = "auto") -> str:
    """The kernel backend to use: `auto` is cuSPARSELt where it runs here, else CUTLASS.

    On a CUDA machine the choice is checked with a tiny 2:4 matmul (see backend_error): PyTorch's
    CUTLASS 2:4 kernels, for one, run only on compute capability 8.x (A100-class) GPUs.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown 2:4 kernel backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if not torch.cuda.is_available():  # nothing to probe; the runtimes refuse first (require_cuda)
        if backend == "auto":
            return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
        return backend
    if backend == "auto":
        why = {b: backend_error(b) for b in BACKENDS[1:]}
        usable = [b for b, e in why.items() if e is None]
        if not usable:
            raise UserError("no 2:4 kernel backend runs on this GPU: "
                            + "; ".join(f"{b}: {e}" for b, e in why.items()))
        return usable[0]
    why = backend_error(backend)
    if why is not None:
        raise UserError(f"the {backend} 2:4 kernels do not run here: {why}")
    return backend


_BACKEND_ERRORS = {}


def backend_error(backend: str) -> str | None:
    """None when `backend`'s 2:4 fp16 matmul runs on this machine's GPU, else one line saying why not."""
    if backend not in _BACKEND_ERRORS:
        _BACKEND_ERRORS[backend] = _probe(backend)
    return _BACKEND_ERRORS[backend]


def _probe(backend):
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    try:
        keep = torch.tensor([1.0, 0.0, 0.0, 1.0], device="cuda").repeat(64, 16)  # 2:4, 64 x 64
        w = (torch.randn(64, 64, device="cuda") * keep).half()
        x = torch.randn(32, 64, device="cuda", dtype=torch.float16)
        y = torch.nn.functional.linear(x, to_semi_structured(w, backend))
        torch.cuda.synchronize()
        if not torch.allclose(y.float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2, atol=1e-2):
            return "a test matmul gave wrong results"
    except RuntimeError as e:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    return None


def to_semi_structured(w: torch.Tensor, backend: str) -> torch.Tensor:
    """A 2:4 CUDA fp16/bf16 matrix as torch's semi-structured sparse tensor on `backend`."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    return cls.from_dense(w.contiguous())


def sparsify_24(model, backend: str) -> tuple[list[str], list[str]]:
    """Swap every 2:4 nn.Linear weight for a semi-structured tensor. Returns (swapped, skipped) names."""
    from ..compressed_format import is_24

    swapped, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not is_24(module.weight.data):
            continue
        try:
            sparse = to_semi_structured(module.weight.data, backend)
        except RuntimeError:  # a shape the kernels do not take (too small / not a multiple of the tile)
            skipped.append(name)
            continue
        module.weight = torch.nn.Parameter(sparse, requires_grad=False)
        module.register_forward_pre_hook(_contiguous_input)  # the sparse matmul views its input as 2-D
        swapped.append(name)
    return swapped, skipped


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class TorchSparse24(Runtime):
    """A model folder (plain or compressed-tensors) on CUDA in fp16/bf16, 2:4 Linears on sparse kernels."""

    name = "torch-sparse24"
    package = "torch"
    sparse = True

    def __init__(self, folder, batch=1, seqlen=128, threads=None, logits="last", dtype="float16",
                 backend="auto"):
        if dtype not in DTYPES:
            raise UserError(f"{self.name} runs in {' or '.join(DTYPES)}, not {dtype}")
        require_cuda(self.name)
        self.dtype, self.backend = dtype, pick_backend(backend)
        self.swapped, self.skipped = [], []
        super().__init__(folder, batch, seqlen, threads, logits)

    @property
    def version(self):
        return f"{torch.__version__} ({self.backend if self.sparse else 'cuBLAS'})"

    def _load(self):
        from .. import models
        from ..export.graph import ExportModule

        model, _ = models.load_model(self.folder, dtype=self.dtype)  # decompresses compressed folders
        model = model.to("cuda").eval()
        if self.sparse:
            self.swapped, self.skipped = sparsify_24(model, self.backend)
            if not self.swapped:
                raise UserError(f"{self.folder} has no 2:4 Linear weight the {self.backend} kernels take")
        self.module = ExportModule(model, self.logits).eval()

    def run(self, input_ids, attention_mask):
        with torch.inference_mode():
            out = self.module(torch.as_tensor(np.asarray(input_ids, np.int64), device="cuda"),
                              torch.as_tensor(np.asarray(attention_mask, np.int64), device="cuda"))
        return out.float().cpu().numpy()  # the copy waits for the GPU

    def close(self):
        self.module = None
        torch.cuda.empty_cache()
        super().close()


class TorchCudaDense(TorchSparse24):
    """The same model on CUDA with dense weights (cuBLAS): the baseline for torch-sparse24."""

    name = "torch-cuda"
    sparse = False
