"""The `prune` job (load -> calibrate -> prune -> save), and rounding a pruned folder afterwards."""

from pathlib import Path

import torch

from .. import archs, data, models
from ..checkpoints import check_shards, streamable
from ..errors import UserError
from ..layerwise import ACTIVATION_BUDGET, pick_device
from ..outputs import Timer, atomic_dir, read_meta
from .driver import prune_model, pruned_meta
from .grid import grid_info, round_weights
from .recipe import Recipe


def plain_copy(model_spec, folder) -> Path:
    """Save MODEL once as a plain safetensors folder (a GGUF is dequantized once) that loads fast."""
    folder = Path(folder)
    if not folder.exists():
        model, tokenizer = models.load_model(model_spec)
        models.save_model_folder(model, tokenizer, folder, {"kind": "dense-model", "source_model": str(model_spec)})
    return folder


def prune(model_spec, out, recipe: Recipe, force: bool = False, threads: int | None = None, log=print,
          device: str = "cpu", stream: bool | None = None, resume: bool = False, offload=None,
          activation_budget: int | None = ACTIVATION_BUDGET, after_layer=None) -> dict:
    """Prune MODEL into the save_pretrained folder `out`. Returns the metadata written.

    after_layer: a hook run around each layer's prune (--recover blockwise: recovery/blockwise.py); its
    meta() goes into the metadata as `recovery`.
    stream: read and write one decoder layer at a time (pruning/stream.py); None: when streamable() says
    so. resume, offload, activation_budget: streamed only (see stream_prune)."""
    recipe.validate()
    models.check_model(model_spec)  # a missing folder or an unreachable hub: one line, before anything else
    if recipe.pruner.needs_calibration:
        data.check_source(recipe.calib, allow_self=True)
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    if stream is None:
        stream = streamable(model_spec, recipe.calib if recipe.pruner.needs_calibration else None)
    if stream:
        from .stream import stream_prune

        kind, where = models.resolve(model_spec)
        if kind != "folder":
            raise UserError(f"--stream needs a local safetensors model folder; {model_spec} loads in memory "
                            "(use --no-stream)")
        return stream_prune(where, out, recipe, force=force, resume=resume, device=dev, offload=offload,
                            activation_budget=activation_budget, log=log, source=model_spec,
                            after_layer=after_layer)
    if resume:
        raise UserError("--resume continues a streamed prune (--stream, or a local safetensors folder over 2 GiB); "
                        "this one runs in memory")
    check_shards(model_spec)
    with atomic_dir(out, force) as tmp:
        with Timer() as t_load:
            model, tokenizer = models.load_model(model_spec)
        models.decoder_layers(model)  # unsupported architecture: fail before calibration
        calib = None
        with Timer() as t_calib:
            if recipe.pruner.needs_calibration:
                calib = data.calibration_windows(recipe.calib, tokenizer, recipe.nsamples,
                                                 recipe.seqlen, recipe.seed, model=model)
        log(f"loaded {model_spec} ({archs.model_type(model)}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {t_load.wall:.1f}s")
        with Timer() as t_prune:
            layer_log, allocation = [], {}
            stats, mode = prune_model(model, calib, recipe, device=dev, layer_log=layer_log, allocation=allocation,
                                      after_layer=after_layer)
        recovery = {"recovery": after_layer.meta(recipe, calib, layer_log)} if after_layer is not None else {}
        meta = pruned_meta(model, recipe, stats, mode, dev, layer_log,
                           {"load_s": t_load.wall, "calibration_data_s": t_calib.wall, "prune_wall_s": t_prune.wall,
                            "prune_cpu_s": t_prune.cpu}, model_spec, allocation=allocation, streamed=False,
                           **recovery)
        models.save_model_folder(model, tokenizer, tmp, meta)
    log(f"pruned {len(stats)} matrices to {meta['pruned_sparsity']:.1%} sparsity in "
        f"{t_prune.wall:.1f}s wall / {t_prune.cpu:.1f}s CPU; peak memory {meta['peak_memory_gib']:.2f} GiB")
    log(f"wrote {out}")
    return meta


def round_pruned_folder(src, out, bits: int = 8, per_channel: bool = True, force: bool = False, log=print,
                        group_size: int | None = None) -> dict:
    """Prune then round: load a pruned model folder, round its matrices, save it with the scales.

    The baseline that joint SparseGPT + quantization should beat; same grid, same metadata layout.
    """
    model, tokenizer = models.load_model(src)
    meta = read_meta(src)
    mats = meta.setdefault("matrices", {})
    with atomic_dir(out, force) as tmp:
        for name, scale in round_weights(model, bits, per_channel, group_size=group_size).items():
            w = models.weight_2d(model.get_submodule(name))
            mats.setdefault(name, {"shape": list(w.shape)})
            mats[name].update(scale=scale, sparsity=float((w == 0).float().mean()))
        meta.setdefault("recipe", {}).update(wbits=bits, per_channel=per_channel, group_size=group_size)
        meta["quantization"] = grid_info(bits, per_channel, "round-after-pruning", group_size)
        meta["rounded_from"] = str(src)
        models.save_model_folder(model, tokenizer, tmp, meta)
    log(f"rounded {len(mats)} matrices of {src} onto the {bits}-bit grid; wrote {out}")
    return meta
