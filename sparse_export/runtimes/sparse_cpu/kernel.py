"""The C++ kernels (kernel.cpp, compiled by the package install through setup.py) through ctypes, and
the torch custom op `sparse_export::int8_linear` that the runtime's Linear modules call.

Code paths: "auto" (AVX-512 VBMI2 + VNNI where the CPU has them, else scalar), "scalar", "avx512".
The environment variable SPARSE_EXPORT_CPU_KERNEL sets the default (e.g. =scalar to force the fallback).
"""

import ctypes
import importlib.util
import os
import time

import numpy as np
import torch

from ...errors import UserError
from .packed import PackedLinear

ABI_VERSION = 9   # kernel.cpp's sc_abi_version(): a library built from another source is refused
PATHS = {"auto": 0, "scalar": 1, "avx512": 2}
PATH_ENV = "SPARSE_EXPORT_CPU_KERNEL"
_MODULE = "sparse_export.runtimes.sparse_cpu._kernel"


class _Layer(ctypes.Structure):
    """kernel.cpp's struct Layer, field for field."""
    _fields_ = [("out", ctypes.c_int64), ("in_", ctypes.c_int64), ("words", ctypes.c_int64),
                ("mask", ctypes.c_void_p), ("values", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("rowsum", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("bits", ctypes.c_int64), ("gsize", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("gscale", ctypes.c_void_p)]


class _StepLayer(ctypes.Structure):
    """kernel.cpp's struct StepLayer: one decoder layer of the native decode step."""
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", ctypes.c_void_p),
                ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _StepModel(ctypes.Structure):
    """kernel.cpp's struct StepModel."""
    _fields_ = [("layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("capacity", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scaling", ctypes.c_float), ("layer", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("head", ctypes.c_void_p)]


_LIB = None


def library() -> ctypes.CDLL:
    """The compiled kernel library (loaded once); UserError when the install did not build it."""
    global _LIB
    if _LIB is None:
        spec = importlib.util.find_spec(_MODULE)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise UserError("the sparse-cpu kernels are not built: reinstall the package with a C++ compiler "
                            "present (`pip install -e .` or `bash scripts/install.sh`)")
        lib = ctypes.CDLL(spec.origin)
        if not hasattr(lib, "sc_abi_version") or lib.sc_abi_version() != ABI_VERSION:
            raise UserError(f"{spec.origin} was built from an older kernel source: reinstall the package "
                            "(`pip install -e .` or `bash scripts/install.sh`)")
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.sc_has_fast.restype = c_int
        lib.sc_quantize.argtypes = [p, i64, i64, i64, p, p, p, c_int]
        lib.sc_quantize.restype = c_int
        lib.sc_linear.argtypes = [p, p, i64, p, p, c_int, c_int]
        lib.sc_linear.restype = c_int
        lib.sc_decode_step.argtypes = [p, p, i64, p, p, p, c_int, c_int, p]
        lib.sc_decode_step.restype = c_int
        lib.sc_decode_batch.argtypes = [p, i64, p, p, p, p, p, c_int, c_int, p]
        lib.sc_decode_batch.restype = c_int
        lib.sc_stream_read.argtypes = [p, i64, c_int, c_int]
        lib.sc_stream_read.restype = ctypes.c_uint64
        _LIB = lib
    return _LIB


def has_avx512() -> bool:
    """Whether this CPU runs the AVX-512 VBMI2 + VNNI path."""
    return bool(library().sc_has_fast())


def resolve_path(path: str | None = None) -> str:
    """The code path to use: `path`, else $SPARSE_EXPORT_CPU_KERNEL, else auto; auto resolves to what runs here."""
    path = path or os.environ.get(PATH_ENV) or "auto"
    if path not in PATHS:
        raise UserError(f"unknown kernel path '{path}' (choose from {', '.join(PATHS)}; from ${PATH_ENV} or --kernel)")
    if path == "avx512" and not has_avx512():
        raise UserError("the avx512 kernel path needs AVX-512 with VBMI2 and VNNI, which this CPU lacks")
    return path if path != "auto" else ("avx512" if has_avx512() else "scalar")


class KernelLayer:
    """A PackedLinear as the kernel sees it: its C struct (whose pointers keep the arrays alive here)."""

    def __init__(self, packed: PackedLinear):
        self.packed = packed
        ptr = (lambda a: None if a is None else a.ctypes.data)
        self._struct = _Layer(packed.out_features, packed.in_features, packed.words, ptr(packed.mask),
                              ptr(packed.values), ptr(packed.offsets), ptr(packed.rowsum), ptr(packed.scale),
                              ptr(packed.bias), packed.bits, packed.group_size,
                              0 if packed.gscale is None else packed.gscale.shape[1], ptr(packed.gscale))
        self.address = ctypes.addressof(self._struct)


def linear(layer: KernelLayer, x: np.ndarray, threads: int = 1, path: str | None = None,
           with_ints: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """y [n, out] float32 for x [n, in] float32 (numpy); with_ints also returns acc - zp * rowsum (int32)."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    if x.ndim != 2 or x.shape[1] != layer.packed.in_features:
        raise UserError(f"input of shape {x.shape} for a Linear with {layer.packed.in_features} inputs")
    y = np.empty((n, layer.packed.out_features), np.float32)
    ints = np.empty((n, layer.packed.out_features), np.int32) if with_ints else None
    rc = library().sc_linear(layer.address, x.ctypes.data, n, y.ctypes.data,
                             None if ints is None else ints.ctypes.data, threads, PATHS[resolve_path(path)])
    _check(rc)
    return (y, ints) if with_ints else y


class NativeStep:
    """The whole decode step of a Llama-family model in C++ (kernel.cpp's decode_step): RMSNorms, rotary,
    attention over the cache, SiLU gate and residuals around the packed matmuls, one call per token.

    layers: per decoder layer (norm1 weight, norm2 weight, qkv, o, gate_up, down KernelLayers, k cache,
    v cache), the weights float32 [hidden] tensors, the caches float32 [kv_heads, capacity, head_dim]
    tensors (all contiguous; held here so the pointers stay valid)."""

    def __init__(self, layers: list, final_norm: torch.Tensor, head: KernelLayer, dims: dict):
        self._keep = (layers, final_norm, head)
        arr = (_StepLayer * len(layers))()
        for i, (n1, n2, qkv, o, gu, down, kc, vc) in enumerate(layers):
            arr[i] = _StepLayer(n1.data_ptr(), n2.data_ptr(), qkv.address, o.address, gu.address, down.address,
                                kc.data_ptr(), vc.data_ptr())
        self._layers = arr
        self.vocab = head.packed.out_features
        self._struct = _StepModel(len(layers), dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"],
                                  dims["inner"], dims["capacity"], dims["eps"], dims["scaling"],
                                  ctypes.addressof(arr), final_norm.data_ptr(), head.address)

    def __call__(self, h: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor, threads: int,
                 path: int) -> torch.Tensor:
        """h: the token's embedding [hidden] float32 (overwritten); cos, sin [head_dim] of position pos.
        Returns the logits [vocab] float32."""
        logits = torch.empty(self.vocab)
        spent = ctypes.c_double(0.0)
        _check(library().sc_decode_step(ctypes.addressof(self._struct), h.data_ptr(), pos, cos.data_ptr(),
                                        sin.data_ptr(), logits.data_ptr(), threads, path, ctypes.byref(spent)))
        clock = KernelClock.active
        if clock:
            clock.seconds += spent.value
            clock.calls += 1
        return logits


def decode_batch(steps: list[NativeStep], h: torch.Tensor, pos: list[int], cos: torch.Tensor, sin: torch.Tensor,
                 threads: int, path: int) -> torch.Tensor:
    """One decode step of B sequences in one call (kernel.cpp's decode_batch): steps[b] is sequence b's
    NativeStep (the same weights, its own cache), h [B, hidden] float32 their tokens' embeddings
    (overwritten), pos[b] its cached tokens, cos, sin [B, head_dim] the rotary tables of those positions.
    Returns the logits [B, vocab] float32, each row bit for bit what steps[b] alone gives."""
    B = len(steps)
    models = (ctypes.c_void_p * B)(*[ctypes.addressof(s._struct) for s in steps])
    positions = (ctypes.c_int64 * B)(*pos)
    logits = torch.empty(B, steps[0].vocab)
    spent = ctypes.c_double(0.0)
    _check(library().sc_decode_batch(models, B, h.data_ptr(), positions, cos.data_ptr(), sin.data_ptr(),
                                     logits.data_ptr(), threads, path, ctypes.byref(spent)))
    clock = KernelClock.active
    if clock:
        clock.seconds += spent.value
        clock.calls += 1
    return logits


def quantize(x: np.ndarray, path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's per-token activation quantization: (uint8 [n, in], scale [n], zero point [n])."""
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    q = np.empty((n, k), np.uint8)
    scale, zp = np.empty(n, np.float32), np.empty(n, np.int32)
    _check(library().sc_quantize(x.ctypes.data, n, k, k, q.ctypes.data, scale.ctypes.data, zp.ctypes.data,
                                 PATHS[resolve_path(path)]))
    return q, scale, zp


def stream_read(buf: np.ndarray, threads: int = 1, path: str | None = None) -> int:
    """Read every byte of buf once (the streaming-read probe). Returns a checksum: the sum, modulo 2**64, of
    buf's little-endian 64-bit words and then of the bytes after the last whole word."""
    buf = np.ascontiguousarray(buf)
    return int(library().sc_stream_read(buf.ctypes.data, buf.nbytes, threads, PATHS[resolve_path(path)]))


def _check(rc):
    if rc == -1:
        raise UserError("the avx512 kernel path cannot run on this CPU")
    if rc != 0:
        raise MemoryError("the sparse-cpu kernel could not allocate its activation buffer")


class KernelClock:
    """Seconds and calls spent inside the kernel while `with KernelClock() as c:` runs (c.seconds, c.calls)."""

    active = None

    def __enter__(self):
        self.seconds, self.calls = 0.0, 0
        KernelClock.active = self
        return self

    def __exit__(self, *exc):
        KernelClock.active = None


def run_linear(x: torch.Tensor, layer: int, out_features: int, threads: int, path: int) -> torch.Tensor:
    """y = the packed Linear at address `layer` (KernelLayer.address) applied to x [..., in]; float32 out."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(x2.shape[0], out_features)
    clock = KernelClock.active
    t = time.perf_counter() if clock else 0.0
    _check(library().sc_linear(layer, x2.data_ptr(), x2.shape[0], y.data_ptr(), None, threads, path))
    if clock:
        clock.seconds += time.perf_counter() - t
        clock.calls += 1
    return y.reshape(*x.shape[:-1], out_features)


# The same function as a torch custom op: what torch.compile / torch.export see. Eager calls go to
# run_linear directly: the dispatcher's Python round trip costs more than a small layer's whole matmul.
@torch.library.custom_op("sparse_export::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, layer: int, out_features: int, threads: int, path: int) -> torch.Tensor:
    """The custom op form of run_linear."""
    return run_linear(x, layer, out_features, threads, path)


@int8_linear.register_fake
def _(x, layer, out_features, threads, path):
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)
