"""The `prune` and `eval` jobs: load -> calibrate -> prune -> save, and load -> perplexity."""

import json
import time
from pathlib import Path

import torch

from . import data, models
from .evaluate import perplexity
from .outputs import META_FILE, Timer, atomic_dir, library_versions, peak_rss_gib, write_json
from .prune import QUANT_HEADROOM, Recipe, prune_model
from .quant import grid_info


def save_model_folder(model, tokenizer, folder, meta):
    """A plain save_pretrained folder (safetensors) plus sparse_export.json."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_json(Path(folder) / META_FILE, meta)


def plain_copy(model_spec, folder):
    """Save MODEL once as a plain safetensors folder (a GGUF is dequantized once) that loads fast."""
    folder = Path(folder)
    if not folder.exists():
        model, tokenizer = models.load_model(model_spec)
        save_model_folder(model, tokenizer, folder, {"kind": "dense-model", "source_model": str(model_spec)})
    return folder


def prune(model_spec, out, recipe: Recipe, force=False, threads=None, log=print):
    """Prune MODEL into the save_pretrained folder `out`. Returns the metadata written."""
    recipe.validate()
    if recipe.method != "magnitude":
        data.check_source(recipe.calib, allow_self=True)
    if threads:
        torch.set_num_threads(threads)
    with atomic_dir(out, force) as tmp:
        with Timer() as t_load:
            model, tokenizer = models.load_model(model_spec)
        models.decoder_layers(model)  # unsupported architecture: fail before calibration
        calib = None
        with Timer() as t_calib:
            if recipe.method != "magnitude":
                calib = data.calibration_windows(recipe.calib, tokenizer, recipe.nsamples,
                                                 recipe.seqlen, recipe.seed, model=model)
        log(f"loaded {model_spec} ({models.model_type(model)}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {t_load.wall:.1f}s")
        with Timer() as t_prune:
            stats, mode = prune_model(model, calib, recipe)
        total = sum(s["shape"][0] * s["shape"][1] for s in stats.values())
        zeros = sum(s["sparsity"] * s["shape"][0] * s["shape"][1] for s in stats.values())
        meta = {
            "kind": "pruned-model",
            "source_model": str(model_spec),
            "architecture": models.model_type(model),
            "recipe": recipe.to_dict(),
            **({"quantization": {**grid_info(recipe.wbits, recipe.per_channel, "joint-sparsegpt"),
                                  "scale_headroom": QUANT_HEADROOM if recipe.wbits == 8 else 1.0}}
               if recipe.wbits else {}),
            "pruned_sparsity": zeros / max(total, 1),
            "calibration_mode": mode,
            "matrices": stats,
            "timing": {"load_s": t_load.wall, "calibration_data_s": t_calib.wall,
                       "prune_wall_s": t_prune.wall, "prune_cpu_s": t_prune.cpu,
                       "threads": torch.get_num_threads()},
            "peak_memory_gib": peak_rss_gib(),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        save_model_folder(model, tokenizer, tmp, meta)
    log(f"pruned {len(stats)} matrices to {meta['pruned_sparsity']:.1%} sparsity in "
        f"{t_prune.wall:.1f}s wall / {t_prune.cpu:.1f}s CPU; peak memory {meta['peak_memory_gib']:.2f} GiB")
    log(f"wrote {out}")
    return meta


def evaluate(model_spec, source="wikitext2", seqlen=2048, max_segments=None, batch=1, model=None,
             tokenizer=None):
    """Perplexity of MODEL on SOURCE. Returns a result dict."""
    data.check_source(source)
    if model is None:
        model, tokenizer = models.load_model(model_spec)
    windows = data.eval_windows(source, tokenizer, seqlen, max_segments)
    with Timer() as t:
        ppl, nll, tokens = perplexity(model, windows, batch=batch)
    return {"model": str(model_spec), "data": str(source), "seqlen": seqlen, "windows": windows.shape[0],
            "tokens": tokens, "perplexity": ppl, "nll": nll, "eval_wall_s": t.wall, "eval_cpu_s": t.cpu}


def format_table(rows, columns):
    """A plain markdown table from dicts."""
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key in columns:
            v = r.get(key, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dump(obj, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
