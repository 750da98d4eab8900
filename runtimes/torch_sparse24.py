"""PyTorch on CUDA with 2:4 weights as semi-structured sparse tensors (cuSPARSELt or CUTLASS kernels).

`torch-cuda` runs the same checkpoint with its dense weights (cuBLAS): the baseline.
"""

import numpy as np
import torch

from sparse_export.errors import UserError

from .base import Runtime

DTYPES = ("float16", "bfloat16")
BACKENDS = ("auto", "cusparselt", "cutlass")


def require_cuda(name="torch-sparse24"):
    if not torch.cuda.is_available():
        raise UserError(f"the {name} runtime needs a CUDA GPU")


def pick_backend(backend="auto"):
    if backend not in BACKENDS:
        raise UserError(f"unknown 2:4 kernel backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    return backend


def to_semi_structured(w, backend):
    """A 2:4 CUDA fp16/bf16 matrix as torch's semi-structured sparse tensor on `backend`."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    return cls.from_dense(w.contiguous())


def sparsify_24(model, backend):
    """Swap every 2:4 nn.Linear weight for a semi-structured tensor. Returns (swapped, skipped) names."""
    from sparse_export.compressed import is_24

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
        from sparse_export import models
        from sparse_export.onnx_export import ExportModule

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
