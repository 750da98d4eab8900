"""`export compressed`: a pruned model folder written in the compressed-tensors format, and the checks
that read it back (bit-identical round trip, 2:4 counted in the written files). The format itself
(bit packing, reading a folder) is sparse_export/compressed_format.py.
"""

import json
import time
from pathlib import Path

import torch

from .. import compat, models
from ..compressed_format import (CT_VERSION, FORMATS, compress_weight, decompress_weight, is_24, read_parts,
                                 read_state_dict, weight_files)
from ..errors import UserError
from ..outputs import META_FILE, atomic_dir, library_versions, read_meta, write_json


# ---- measuring and choosing the format ----

def matrix_stats(model) -> dict:
    """{name: {"module", "sparsity", "is_24", "bits"}} for the prunable weights, as they are stored."""
    out = {}
    for name in models.prunable_names(model):
        module = model.get_submodule(name)
        w = module.weight.data
        out[name] = {"module": type(module).__name__, "sparsity": float((w == 0).float().mean()),
                     "is_24": is_24(w), "bits": w.element_size() * 8}
    return out


def sparse_names(stats: dict) -> list[str]:
    """Weights stored smaller as a bitmask: more zeros than the 1 bit per weight the mask costs."""
    return [n for n, s in stats.items() if s["sparsity"] > 1 / s["bits"]]


def choose_format(stats: dict, fmt: str = "auto") -> tuple[str, list[str], str]:
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


def sparsity_config(model, fmt: str, names: list[str], structure: str) -> dict:
    """The sparsity_config block: targets are module classes, ignore the other modules of those classes."""
    kinds = {type(model.get_submodule(n)).__name__ for n in names} or {"Linear"}
    chosen = set(names)
    ignore = [n for n, m in model.named_modules() if type(m).__name__ in kinds and n not in chosen]
    params = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in params)
    return {"format": fmt, "global_sparsity": zeros / sum(p.numel() for p in params),
            "sparsity_structure": structure, "targets": sorted(kinds), "ignore": ignore}


def _compress_files(folder, fmt, names):
    """Rewrite the save_pretrained safetensors in `folder`, compressing `names`. Returns (dense, written) bytes."""
    from safetensors.torch import load_file, save_file

    wanted = {f"{n}.weight": n for n in names}
    dense = written = 0
    index_path = folder / "model.safetensors.index.json"
    weight_map = {}
    for path in weight_files(folder):
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


def export_compressed(model_dir, out, fmt: str = "auto", force: bool = False, log=print) -> dict:
    """Write MODEL_DIR as a compressed-tensors folder at `out`. Returns the metadata written."""
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    if fmt not in ("auto",) + FORMATS:
        raise UserError(f"unknown format '{fmt}' (choose from auto, {', '.join(FORMATS)})")
    with atomic_dir(out, force) as tmp:
        model, tokenizer = models.load_model(model_dir)
        stats = matrix_stats(model)
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
        compat.portable_folder(tmp)  # transformers 4.x + compressed-tensors 0.14 read this folder
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


def count_24(folder) -> dict[str, dict]:
    """2:4 counted in the written files: per compressed weight, groups of 4 and those with > 2 nonzeros."""
    out = {}
    for prefix, parts in read_parts(folder)[0].items():
        w = decompress_weight(parts)
        kept = (w.reshape(-1, 4) != 0).sum(dim=1) if w.shape[1] % 4 == 0 else torch.full((1,), 4)
        out[prefix] = {"groups": kept.numel(), "violations": int((kept > 2).sum()),
                       "sparsity": float((w == 0).float().mean())}
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def round_trip_mismatches(dense_folder, folder, reference: bool = False) -> list[str]:
    """Keys whose weight read back from the compressed `folder` is not bit-identical to `dense_folder`'s.

    reference: read it with compressed-tensors' decompressor (ImportError when it is not installed).
    """
    expected = read_parts(dense_folder)[1]
    if reference:
        from compressed_tensors.compressors import ModelCompressor

        got = dict(ModelCompressor.from_pretrained(str(folder)).sparsity_compressor.decompress(str(folder)))
    else:
        got = read_state_dict(folder)
    keys = sorted(set(expected) | set(got))
    return [k for k in keys if k not in expected or k not in got or not bits_equal(expected[k], got[k])]


