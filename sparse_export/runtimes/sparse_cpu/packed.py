"""The packed int8 format of one Linear, as the kernel reads it.

Weights W (out x in) sit on a per-row int8 grid: W = scale[r] * q[r, :], q int8. Two layouts:

  bitmask  mask    uint64 [out, words]   words = ceil(in / 64); bit j of word w marks column 64w+j nonzero
           values  int8 [nnz + 64]       the nonzero q, row by row (the tail: slack for 64-byte loads)
           offsets int64 [out + 1]       where each row's nonzeros start in values
  dense    values  int8 [out, 64*words]  q, each row padded with zeros to whole 64-byte blocks

and in both: rowsum int32 [out] (sum of q per row: the activation zero point's correction), scale
float32 [out], bias float32 [out] or None. Columns past `in` (padding) are zero: no mask bit, no value.
"""

from dataclasses import dataclass

import numpy as np

from ...errors import UserError

WORD = 64                 # weights per mask word, and bytes per kernel block
MAX_IN_FEATURES = 65536   # int32 accumulators: 255 * 128 * in must stay below 2**31


@dataclass
class PackedLinear:
    out_features: int
    in_features: int
    values: np.ndarray
    rowsum: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None
    mask: np.ndarray | None = None      # None: the dense layout
    offsets: np.ndarray | None = None

    @property
    def words(self) -> int:
        return -(-self.in_features // WORD)

    @property
    def dense(self) -> bool:
        return self.mask is None

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1]) if not self.dense else int(np.count_nonzero(self.values))

    def nbytes(self) -> dict:
        """Bytes of each part. `weight` = values (the nonzeros, or every padded weight when dense) + mask +
        scales; `read` = every byte a pass over the layer reads (adds offsets, row sums and bias)."""
        values = self.nnz if not self.dense else self.out_features * WORD * self.words
        mask = 0 if self.dense else self.mask.nbytes
        extra = self.rowsum.nbytes + (0 if self.dense else self.offsets.nbytes) + \
            (self.bias.nbytes if self.bias is not None else 0)
        return {"values": values, "mask": mask, "scales": self.scale.nbytes,
                "weight": values + mask + self.scale.nbytes, "read": values + mask + self.scale.nbytes + extra}


def pack(q: np.ndarray, scale, bias=None, dense: bool = False) -> PackedLinear:
    """q int8 [out, in] (the weights on their grid), scale per row, bias or None -> PackedLinear."""
    q = np.ascontiguousarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise UserError(f"pack() wants a 2-D int8 matrix, not {q.dtype} {q.shape}")
    out, n_in = q.shape
    if n_in > MAX_IN_FEATURES:
        raise UserError(f"in_features {n_in} is over the kernel's limit of {MAX_IN_FEATURES}")
    scale = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(out))
    bias = None if bias is None else np.ascontiguousarray(np.asarray(bias, np.float32).reshape(out))
    words = -(-n_in // WORD)
    padded = np.zeros((out, words * WORD), np.int8)
    padded[:, :n_in] = q
    rowsum = q.sum(axis=1, dtype=np.int64).astype(np.int32)
    if dense:
        return PackedLinear(out, n_in, padded, rowsum, scale, bias)
    nonzero = padded != 0
    # little bit order: byte k, bit i <-> column 8k+i; 8 bytes read as a little-endian uint64: bit 8k+i
    mask = np.packbits(nonzero, axis=1, bitorder="little").view("<u8").reshape(out, words)
    values = np.concatenate([padded[nonzero], np.zeros(WORD, np.int8)])   # row-major order: row by row
    offsets = np.zeros(out + 1, np.int64)
    np.cumsum(nonzero.sum(axis=1), out=offsets[1:])
    return PackedLinear(out, n_in, values, rowsum, scale, bias, np.ascontiguousarray(mask), offsets)


def unpack(p: PackedLinear) -> np.ndarray:
    """The int8 matrix [out, in] back from either layout."""
    if p.dense:
        return p.values[:, :p.in_features].copy()
    bits = np.unpackbits(p.mask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    q = np.zeros(bits.shape, np.int8)
    q[bits] = p.values[:p.nnz]
    return q[:, :p.in_features]


def int8_grid(w, scale=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(q int8 [out, in], scale per row, exact) for weights w (out x in, a torch tensor).

    With `scale` (the grid a --wbits prune recorded) the weights are read back as integers on it: exact
    for float32 weights; bf16/fp16 storage moves them by less than half a step, so they round back.
    Without it each row is rounded to nearest on the grid max|w| / 127 (exact=False).
    """
    import torch

    from ...pruning.grid import grid_tolerance, int_weight

    stored = w.dtype
    w = w.detach().float()
    if scale is not None:
        q = int_weight(w, scale, tol=grid_tolerance(stored))
        return q.numpy(), np.asarray(scale, np.float32).reshape(-1), True
    s = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.clamp(torch.round(w / s[:, None]), -128, 127).to(torch.int8)
    return q.numpy(), s.numpy(), False
