"""The compressed-tensors sparse format (sparse-24-bitmask / sparse-bitmask): one weight packed and
unpacked, and a folder read back into a dense model. The writer is export/compressed.py.

The layout is the one compressed-tensors 0.14.0.1 (the last release with sparse compressors)
reads. config.json gets

    "quantization_config": {"quant_method": "compressed-tensors", "version": ...,
        "sparsity_config": {"format", "global_sparsity", "sparsity_structure", "targets", "ignore"},
        "config_groups": {}, "transform_config": {}, "format": "dense"}

("config_groups": {} because late vLLM versions read that key without a check; compressed-tensors then
takes the block for an empty quantization config, and "format": "dense" keeps it from looking up its
default "fakequant" compressor, which does not exist.) Each compressed module M stores, instead of
M.weight (as saved: out x in for nn.Linear):

    M.compressed  the kept values, in the weight's dtype
                  sparse-24-bitmask: rows x cols/2, exactly 2 per group of 4 (row-major)
                  sparse-bitmask:    1-D, the nonzeros in row-major order
    M.bitmask     uint8 rows x ceil(cols/8): bit j%8 (little-endian) of byte j//8 marks a kept value
    M.shape       int64, the dense shape: [[rows], [cols]] (2:4) or [rows, cols] (bitmask)
    M.row_offsets int64 [rows], index of each row's first value (sparse-bitmask only)
"""

import json
from pathlib import Path

import torch

from .errors import UserError

FORMATS = ("sparse-24-bitmask", "sparse-bitmask", "dense")
CT_VERSION = "0.14.0.1"  # the compressed-tensors release whose format we write
PARTS = ("compressed", "bitmask", "shape", "row_offsets")


# ---- bitmasks and one weight ----

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool rows x cols -> uint8 rows x ceil(cols/8), little-endian bit order within a byte."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def is_24(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive values along the last dim has at least 2 zeros."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(-1, 4) == 0).sum(1) >= 2).all())


def compress_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """{part: tensor} for one 2-D weight (part names without the module prefix)."""
    rows, cols = w.shape
    if fmt == "sparse-24-bitmask":
        groups = (w.reshape(-1, 4) != 0).to(torch.uint8)
        # keep the (at most 2) nonzeros of each group, padded with its first zeros to exactly 2
        keep = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True).view(rows, cols)
        return {"compressed": w[mask].view(rows, cols // 2), "bitmask": pack_bits(mask),
                "shape": torch.tensor([[rows], [cols]])}
    mask = w != 0
    counts = mask.sum(dim=1)
    return {"compressed": w[mask], "bitmask": pack_bits(mask), "shape": torch.tensor([rows, cols]),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def decompress_weight(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense weight from {compressed, bitmask, shape[, row_offsets]} (both sparse formats)."""
    rows, cols = (int(x) for x in parts["shape"].flatten())
    mask = unpack_bits(parts["bitmask"], cols)
    values = parts["compressed"].flatten()
    if mask.shape != (rows, cols) or int(mask.sum()) != values.numel():
        raise UserError(f"corrupt compressed weight: bitmask does not match {values.numel()} values")
    w = torch.zeros(rows, cols, dtype=values.dtype)
    w[mask] = values
    return w


# ---- reading a folder ----

def weight_files(folder) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights")
    return files


def is_compressed_folder(folder) -> bool:
    return compression_config(folder) is not None


def compression_config(folder) -> dict | None:
    """The compressed-tensors config of a folder with a sparsity config, else None."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except ValueError:
        return None
    qc = c.get("quantization_config") or c.get("compression_config") or {}
    return qc if isinstance(qc, dict) and qc.get("sparsity_config") else None


def read_parts(folder) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {part: tensor}} of the compressed weights, {key: tensor} of the rest)."""
    from safetensors.torch import load_file

    raw = {}
    for path in weight_files(folder):
        raw.update(load_file(path))
    grouped, plain = {}, {}
    for key, t in raw.items():
        prefix, _, part = key.rpartition(".")
        if part in PARTS and f"{prefix}.bitmask" in raw:
            grouped.setdefault(prefix, {})[part] = t
        else:
            plain[key] = t
    return grouped, plain


def read_state_dict(folder) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed folder (compressed weights decompressed)."""
    grouped, out = read_parts(folder)
    for prefix, parts in grouped.items():
        out[f"{prefix}.weight"] = decompress_weight(parts)
    return out


def load_compressed(folder, dtype: str | None = "auto") -> tuple:
    """(model, tokenizer) of a compressed-tensors folder, as a plain transformers model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    qc = compression_config(folder)
    if qc.get("config_groups"):
        raise UserError(f"{folder} is quantized (config_groups); only sparse compressed-tensors "
                        "folders are read")
    config = AutoConfig.from_pretrained(folder)
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # the class the Auto loader picks
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=read_state_dict(folder), dtype=dtype, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        bad = sorted(info["missing_keys"]) or sorted(info["unexpected_keys"])
        raise UserError(f"{folder}: weights do not match the model ({len(bad)} keys, first: {bad[0]})")
    return model, AutoTokenizer.from_pretrained(folder)
