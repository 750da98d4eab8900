"""compressed-tensors checkpoints (sparse-24-bitmask / sparse-bitmask / dense): writer and reader.

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
import time
from pathlib import Path

import torch

from . import models
from .errors import UserError
from .outputs import META_FILE, atomic_dir, library_versions, read_meta, write_json

FORMATS = ("sparse-24-bitmask", "sparse-bitmask", "dense")
CT_VERSION = "0.14.0.1"  # the compressed-tensors release whose format we write
PARTS = ("compressed", "bitmask", "shape", "row_offsets")


# ---- bitmasks and one weight ----

def pack_bits(mask):
    """bool rows x cols -> uint8 rows x ceil(cols/8), little-endian bit order within a byte."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed, cols):
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def is_24(w):
    """Every group of 4 consecutive values along the last dim has at least 2 zeros."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(-1, 4) == 0).sum(1) >= 2).all())


def compress_weight(w, fmt):
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


def decompress_weight(parts):
    """Dense weight from {compressed, bitmask, shape[, row_offsets]} (both sparse formats)."""
    rows, cols = (int(x) for x in parts["shape"].flatten())
    mask = unpack_bits(parts["bitmask"], cols)
    values = parts["compressed"].flatten()
    if mask.shape != (rows, cols) or int(mask.sum()) != values.numel():
        raise UserError(f"corrupt compressed weight: bitmask does not match {values.numel()} values")
    w = torch.zeros(rows, cols, dtype=values.dtype)
    w[mask] = values
    return w


# ---- measuring and choosing the format ----

def measure(model):
    """{name: {"module", "sparsity", "is_24", "bits"}} for the prunable weights, as they are stored."""
    out = {}
    for name in models.prunable_names(model):
        module = model.get_submodule(name)
        w = module.weight.data
        out[name] = {"module": type(module).__name__, "sparsity": float((w == 0).float().mean()),
                     "is_24": is_24(w), "bits": w.element_size() * 8}
    return out


def sparse_names(stats):
    """Weights stored smaller as a bitmask: more zeros than the 1 bit per weight the mask costs."""
    return [n for n, s in stats.items() if s["sparsity"] > 1 / s["bits"]]


def choose_format(stats, fmt="auto"):
    """(format, names to compress, sparsity structure). UserError when fmt does not fit the model."""
    sparse = sparse_names(stats)
    all_24 = bool(sparse) and all(stats[n]["is_24"] for n in sparse)
    structure = "2:4" if all_24 else "unstructured"
    if fmt == "auto":
        fmt = "sparse-24-bitmask" if all_24 else ("sparse-bitmask" if sparse else "dense")
    if fmt == "sparse-24-bitmask" and not all_24:
        bad = [n for n in sparse if not stats[n]["is_24"]]
        if not sparse:
            raise UserError("sparse-24-bitmask needs a 2:4 pruned model, but no weight is sparse")
        raise UserError(f"sparse-24-bitmask needs a 2:4 pruned model, but {len(bad)} of {len(sparse)} "
                        f"sparse weights are not 2:4 (first: {bad[0]}); use --format sparse-bitmask")
    return fmt, ([] if fmt == "dense" else sparse), structure


def sparsity_config(model, fmt, names, structure):
    """The sparsity_config block: targets are module classes, ignore the other modules of those classes."""
    kinds = {type(model.get_submodule(n)).__name__ for n in names} or {"Linear"}
    chosen = set(names)
    ignore = [n for n, m in model.named_modules() if type(m).__name__ in kinds and n not in chosen]
    params = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in params)
    return {"format": fmt, "global_sparsity": zeros / sum(p.numel() for p in params),
            "sparsity_structure": structure, "targets": sorted(kinds), "ignore": ignore}


# ---- files ----

def _weight_files(folder):
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights")
    return files


def _compress_files(folder, fmt, names):
    """Rewrite the save_pretrained safetensors in `folder`, compressing `names`. Returns (dense, written) bytes."""
    from safetensors.torch import load_file, save_file

    wanted = {f"{n}.weight": n for n in names}
    dense = written = 0
    index_path = folder / "model.safetensors.index.json"
    weight_map = {}
    for path in _weight_files(folder):
        tensors = {}
        for key, t in load_file(path).items():
            dense += t.nbytes
            if key in wanted:
                name = wanted.pop(key)
                parts = {f"{name}.{part}": v for part, v in compress_weight(t, fmt).items()}
            else:
                parts = {key: t}
            tensors.update(parts)
            written += sum(v.nbytes for v in parts.values())
        save_file(tensors, path, metadata={"format": "pt"})
        weight_map.update({k: path.name for k in tensors})
    if wanted:
        raise UserError(f"weights not found in the saved checkpoint: {sorted(wanted)[:3]}")
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["metadata"]["total_size"] = written
        index["weight_map"] = dict(sorted(weight_map.items()))
        write_json(index_path, index)
    return dense, written


def _folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def export_compressed(model_dir, out, fmt="auto", force=False, log=print):
    """Write MODEL_DIR as a compressed-tensors folder at `out`. Returns the metadata written."""
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    if fmt not in ("auto",) + FORMATS:
        raise UserError(f"unknown format '{fmt}' (choose from auto, {', '.join(FORMATS)})")
    with atomic_dir(out, force) as tmp:
        model, tokenizer = models.load_model(model_dir)
        stats = measure(model)
        fmt, names, structure = choose_format(stats, fmt)
        sconfig = sparsity_config(model, fmt, names, structure)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dense_bytes, weight_bytes = _compress_files(tmp, fmt, names)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": CT_VERSION,
                                      "sparsity_config": sconfig, "config_groups": {},
                                      "transform_config": {}, "format": "dense"}
        write_json(tmp / "config.json", cfg)
        meta = {
            "kind": "compressed-tensors",
            "source_model": str(model_dir),
            "format": fmt,
            "sparsity_structure": structure,
            "global_sparsity": sconfig["global_sparsity"],
            "compressed_modules": len(names),
            "dense_weight_bytes": dense_bytes,
            "weight_bytes": weight_bytes,
            "size_ratio": weight_bytes / dense_bytes,
            "matrices": {n: {"sparsity": s["sparsity"], "is_24": s["is_24"], "compressed": n in names}
                         for n, s in stats.items()},
            "pruned_from": read_meta(model_dir).get("recipe"),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / META_FILE, meta)
        meta["folder_bytes"] = _folder_bytes(tmp)
    log(f"{fmt}: {len(names)} weights compressed, global sparsity {sconfig['global_sparsity']:.1%}; "
        f"weights {weight_bytes / 2**20:.2f} MiB vs {dense_bytes / 2**20:.2f} MiB dense, "
        f"{1 - weight_bytes / dense_bytes:.1%} smaller ({weight_bytes / dense_bytes:.3f}x)")
    log(f"wrote {out}")
    return meta


# ---- reading ----

def is_compressed_folder(folder):
    return compression_config(folder) is not None


def compression_config(folder):
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


def _read_parts(folder):
    """({module: {part: tensor}} of the compressed weights, {key: tensor} of the rest)."""
    from safetensors.torch import load_file

    raw = {}
    for path in _weight_files(folder):
        raw.update(load_file(path))
    grouped, plain = {}, {}
    for key, t in raw.items():
        prefix, _, part = key.rpartition(".")
        if part in PARTS and f"{prefix}.bitmask" in raw:
            grouped.setdefault(prefix, {})[part] = t
        else:
            plain[key] = t
    return grouped, plain


def read_state_dict(folder):
    """The dense state dict of a compressed folder (compressed weights decompressed)."""
    grouped, out = _read_parts(folder)
    for prefix, parts in grouped.items():
        out[f"{prefix}.weight"] = decompress_weight(parts)
    return out


def count_24(folder):
    """2:4 counted in the written files: per compressed weight, groups of 4 and those with > 2 nonzeros."""
    out = {}
    for prefix, parts in _read_parts(folder)[0].items():
        w = decompress_weight(parts)
        kept = (w.reshape(-1, 4) != 0).sum(dim=1) if w.shape[1] % 4 == 0 else torch.full((1,), 4)
        out[prefix] = {"groups": kept.numel(), "violations": int((kept > 2).sum()),
                       "sparsity": float((w == 0).float().mean())}
    return out


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def round_trip_mismatches(dense_folder, folder, reference=False):
    """Keys whose weight read back from the compressed `folder` is not bit-identical to `dense_folder`'s.

    reference: read it with compressed-tensors' decompressor (ImportError when it is not installed).
    """
    expected = _read_parts(dense_folder)[1]
    if reference:
        from compressed_tensors.compressors import ModelCompressor

        got = dict(ModelCompressor.from_pretrained(str(folder)).sparsity_compressor.decompress(str(folder)))
    else:
        got = read_state_dict(folder)
    keys = sorted(set(expected) | set(got))
    return [k for k in keys if k not in expected or k not in got or not bits_equal(expected[k], got[k])]


def load_compressed(folder, dtype="auto"):
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
