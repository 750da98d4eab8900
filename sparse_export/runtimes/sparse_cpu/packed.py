"""The packed int8 and int4 formats of one Linear, as the kernel reads them.

Weights W (out x in) sit on a per-row int8 grid: W = scale[r] * q[r, :], q int8. Two layouts:

  bitmask  mask    uint64 [out, words]   words = ceil(in / 64); bit j of word w marks column 64w+j nonzero
           values  int8 [nnz + 64]       the nonzero q, row by row (the tail: slack for 64-byte loads)
           offsets int64 [out + 1]       where each row's nonzeros start in values
  dense    values  int8 [out, 64*words]  q, each row padded with zeros to whole 64-byte blocks

and in both: rowsum int32 [out] (sum of q per row: the activation zero point's correction), scale
float32 [out], bias float32 [out] or None. Columns past `in` (padding) are zero: no mask bit, no value.

Int4 (bits=4; weights q in [-8, 7] on a grid with one scale per row and group of `group_size` columns:
W = gscale[r, g] * q[r, k], g = k // group_size). Nibbles hold q + 8 (offset binary), two per byte: the
first weight of a pair in the low nibble, the second in the high one (sparse; the dense layout below differs).

  bitmask  mask    uint64 [out, words]   as int8
           values  uint8 [bytes + 32]    per row, per mask word: its nonzeros' nibbles in column order,
                                         ceil(popcount / 2) bytes (an odd count leaves the last high
                                         nibble unused), so each word starts on a byte; 32 bytes slack
           offsets int64 [out + 1]       where each row's bytes start in values
  dense    values  uint8 [out, 32*words] every weight: per 128 columns of a row a 64-byte block, byte k
                                         holding column k (low nibble) and 64 + k (high); an odd last
                                         64-column word a 32-byte block (columns k and 32 + k); padding q=0

and in both: gscale float16 [out, groups] (groups * group_size >= in; the group scales the pruner made are
float16 values, so this is exact), bias float32 [out] or None; no rowsum (the kernel sums each group's
weights as it goes) and no per-row scale.
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
    bits: int = 8                       # 8: int8 values and per-row scales; 4: nibbles and group scales
    group_size: int = 0                 # int4: columns per scale group
    gscale: np.ndarray | None = None    # int4: float16 [out, groups]

    @property
    def words(self) -> int:
        return -(-self.in_features // WORD)

    @property
    def dense(self) -> bool:
        return self.mask is None

    @property
    def nnz(self) -> int:
        if self.bits == 4:
            return int(np.count_nonzero(unpack(self)))
        return int(self.offsets[-1]) if not self.dense else int(np.count_nonzero(self.values))

    def nbytes(self) -> dict:
        """Bytes of each part. `weight` = values (the nonzeros, or every padded weight when dense) + mask +
        scales; `read` = every byte a pass over the layer reads (adds offsets, row sums and bias)."""
        if self.bits == 4:
            values = int(self.offsets[-1]) if not self.dense else self.values.nbytes
            scales = self.gscale.nbytes
        else:
            values = self.nnz if not self.dense else self.out_features * WORD * self.words
            scales = self.scale.nbytes
        mask = 0 if self.dense else self.mask.nbytes
        extra = (self.rowsum.nbytes if self.rowsum is not None else 0) + \
            (0 if self.dense else self.offsets.nbytes) + (self.bias.nbytes if self.bias is not None else 0)
        return {"values": values, "mask": mask, "scales": scales,
                "weight": values + mask + scales, "read": values + mask + scales + extra}


def _int_matrix(q: np.ndarray, who: str) -> tuple[np.ndarray, int, int]:
    """q as a contiguous 2-D int8 matrix within the kernel's width, and its shape; UserError otherwise."""
    q = np.ascontiguousarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise UserError(f"{who}() wants a 2-D int8 matrix, not {q.dtype} {q.shape}")
    out, n_in = q.shape
    if n_in > MAX_IN_FEATURES:
        raise UserError(f"in_features {n_in} is over the kernel's limit of {MAX_IN_FEATURES}")
    return q, out, n_in


def pack(q: np.ndarray, scale, bias=None, dense: bool = False) -> PackedLinear:
    """q int8 [out, in] (the weights on their grid), scale per row, bias or None -> PackedLinear."""
    q, out, n_in = _int_matrix(q, "pack")
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


def half_exact(scale) -> bool:
    """Whether every scale is a float16 value (what the int4 layout stores)."""
    s = np.asarray(scale, np.float32)
    return bool(np.all(s.astype(np.float16).astype(np.float32) == s) and np.all(s > 0))


def pack4(q: np.ndarray, gscale, bias=None, dense: bool = False) -> PackedLinear:
    """q int8 [out, in] with values in [-8, 7], gscale [out, groups] (groups dividing in; [out] or [out, 1]:
    one scale per row), bias or None -> the int4 PackedLinear."""
    q, out, n_in = _int_matrix(q, "pack4")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise UserError("int4 packing needs weights in [-8, 7]")
    gscale = np.asarray(gscale, np.float32).reshape(out, -1)
    groups = gscale.shape[1]
    words = -(-n_in // WORD)
    if groups == 1:
        group_size = WORD * words                       # one scale per row: one group over the padded row
    elif n_in % groups:
        raise UserError(f"{groups} scale groups do not divide {n_in} input columns")
    else:
        group_size = n_in // groups
        if group_size % 32:
            raise UserError(f"the int4 kernel needs groups of a multiple of 32 columns, not {group_size}")
    if not half_exact(gscale):
        raise UserError("int4 group scales must be positive float16 values (as the pruner makes them)")
    bias = None if bias is None else np.ascontiguousarray(np.asarray(bias, np.float32).reshape(out))
    padded = np.zeros((out, words * WORD), np.int8)
    padded[:, :n_in] = q
    nib = (padded.astype(np.int16) + 8).astype(np.uint8)
    common = dict(bits=4, group_size=group_size, gscale=np.ascontiguousarray(gscale.astype(np.float16)))
    if dense:
        return PackedLinear(out, n_in, _split_nibbles(nib), None, None, bias, **common)
    nonzero = padded != 0
    mask = np.packbits(nonzero, axis=1, bitorder="little").view("<u8").reshape(out, words)
    count = nonzero.reshape(out * words, WORD).sum(axis=1)              # nonzeros per (row, word)
    slots = count + count % 2                                            # nibbles per word: a whole byte count
    slot_start = np.zeros(out * words + 1, np.int64)
    np.cumsum(slots, out=slot_start[1:])
    nz_start = np.zeros(out * words + 1, np.int64)
    np.cumsum(count, out=nz_start[1:])
    word_of = np.repeat(np.arange(out * words), count)                   # each nonzero's (row, word), in order
    where = slot_start[word_of] + np.arange(len(word_of)) - nz_start[word_of]
    stream = np.full(int(slot_start[-1]), 8, np.uint8)
    stream[where] = nib[nonzero]
    values = np.concatenate([stream[0::2] | (stream[1::2] << 4), np.zeros(32, np.uint8)])
    offsets = np.ascontiguousarray(slot_start[::words] // 2)
    return PackedLinear(out, n_in, values, None, None, bias, np.ascontiguousarray(mask), offsets, **common)


def _split_nibbles(nib: np.ndarray) -> np.ndarray:
    """Dense int4 rows [out, 64 * words] of nibbles -> bytes [out, 32 * words]: each 128 columns a 64-byte
    block, byte k holding column k (low nibble) and column 64 + k (high); an odd last word a 32-byte block,
    byte k holding its column k (low) and 32 + k (high). The kernel expands a word with one mask (and a shift)."""
    out, cols = nib.shape
    cut = cols // 128 * 128
    blocks = [nib[:, :cut].reshape(out, -1, 2, 64), nib[:, cut:].reshape(out, -1, 2, 32)]   # + an odd last word
    return np.ascontiguousarray(np.concatenate([(b[:, :, 0] | (b[:, :, 1] << 4)).reshape(out, -1) for b in blocks],
                                               axis=1))


def _join_nibbles(values: np.ndarray) -> np.ndarray:
    """_split_nibbles undone: bytes [out, 32 * words] -> nibbles [out, 64 * words]."""
    out, nbytes = values.shape
    cut = nbytes // 64 * 64
    blocks = [values[:, :cut].reshape(out, -1, 1, 64), values[:, cut:].reshape(out, -1, 1, 32)]
    return np.concatenate([np.concatenate([b & 15, b >> 4], axis=2).reshape(out, -1) for b in blocks], axis=1)


def _unpack4(p: PackedLinear) -> np.ndarray:
    out, words = p.out_features, p.words
    if p.dense:
        nib = _join_nibbles(p.values)
        return (nib.astype(np.int16) - 8).astype(np.int8)[:, :p.in_features]
    bits = np.unpackbits(p.mask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    count = bits.reshape(out * words, WORD).sum(axis=1)
    nbytes = int(p.offsets[-1])
    stream = np.empty(2 * nbytes, np.uint8)
    stream[0::2], stream[1::2] = p.values[:nbytes] & 15, p.values[:nbytes] >> 4
    slots = count + count % 2
    slot_start = np.concatenate([[0], np.cumsum(slots)])
    nz_start = np.concatenate([[0], np.cumsum(count)])
    word_of = np.repeat(np.arange(out * words), count)
    where = slot_start[word_of] + np.arange(len(word_of)) - nz_start[word_of]
    q = np.zeros(bits.shape, np.int8)
    q[bits] = (stream[where].astype(np.int16) - 8).astype(np.int8)
    return q[:, :p.in_features]


def unpack(p: PackedLinear) -> np.ndarray:
    """The int8 matrix [out, in] back from either layout (int4 weights as int8 values in [-8, 7])."""
    if p.bits == 4:
        return _unpack4(p)
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


def int4_grid(w, scale) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [out, in] in [-8, 7], scales [out, groups]) for weights w (a torch tensor) read back exactly on
    the 4-bit (or coarser) grid a --wbits prune recorded: per row ([out]: one group) or per group."""
    from ...pruning.grid import grid_tolerance, int_weight

    q = int_weight(w.detach().float(), scale, bits=4, tol=grid_tolerance(w.dtype))
    s = np.asarray(scale, np.float32)
    return q.numpy(), s.reshape(s.shape[0], -1)
