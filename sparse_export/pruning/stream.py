"""Streamed pruning: a safetensors model folder pruned one decoder layer at a time, from its shards
straight into output shards, resumable.

The model is a skeleton on the meta device. The tensors before the first layer are read to capture
its inputs, then released; each layer is read when its turn comes, pruned by driver.prune_layer (the
code the in-memory driver runs), written as its own shard and released; the LM head is only copied.
Everything is built in a work folder beside --out (`.NAME.work`): the output folder, the hidden
states after the last finished layer, and state.json (what is done). A killed run leaves the work
folder; `--resume` continues after its last finished layer, and a run without it starts over.
With --allocation owl, a first pass streams the dense layers from the shards the same way to measure
their outlier ratios; the per-layer sparsities go into state.json, so a resumed run reuses them.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .. import archs, data, models
from ..checkpoints import (Layout, ShardReader, load_tensors, release, shard_name, shard_tensors, skeleton,
                           write_index, write_shard)
from ..errors import UserError
from ..layerwise import ACTIVATION_BUDGET, LayerBar, activation_stores, capture_first_layer_inputs, pick_device
from ..outputs import META_FILE, Timer, peak_rss_gib, publish, write_json
from .driver import calibration_mode, hook_note, layer_modules, layer_recipe, prune_layer, pruned_meta
from .grid import check_group_widths
from .owl import layer_outlier_ratio, owl_record
from .recipe import Recipe

STATE_FILE = "state.json"


def work_dir(out) -> Path:
    """The work folder of a streamed prune into `out`: beside it, hidden."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def _fingerprint(folder: Path, reader: ShardReader, recipe: Recipe, calib, device, batch: int,
                 after_layer=None) -> dict:
    """What decides the output: a work folder is resumed only by a run with the same fingerprint."""
    files = [[f, (folder / f).stat().st_size, int((folder / f).stat().st_mtime)] for f in reader.files]
    ids = hashlib.sha256(calib.numpy().tobytes()).hexdigest() if calib is not None else None
    return {"source": str(folder.resolve()), "shards": files, "recipe": recipe.to_dict(),
            "calibration_sha256": ids, "device": device.type, "batch": batch,
            **({"recovery": after_layer.record()} if after_layer is not None else {})}


def _read_state(work: Path) -> dict | None:
    try:
        return json.loads((work / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_state(work: Path, state: dict) -> None:
    tmp = work / (STATE_FILE + ".partial")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, work / STATE_FILE)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or type(e).__name__})") from None


def _save_files(model, tokenizer, src: Path, dst: Path) -> None:
    """config.json, generation_config.json and the tokenizer, as save_model_folder writes them."""
    from transformers import GenerationConfig

    from ..compat import portable_folder

    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(dst)
    try:
        GenerationConfig.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError):
        if model.can_generate():
            GenerationConfig.from_model_config(config).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    portable_folder(dst)


def _write_index(folder: Path) -> None:
    weight_map, total = {}, 0
    for f in sorted(folder.glob("model-*-of-*.safetensors")):
        for name, meta in shard_tensors(f).items():
            weight_map[name] = f.name
            total += meta["data_offsets"][1] - meta["data_offsets"][0]
    write_index(folder, weight_map, total)


def _layer_tensors(model, reader: ShardReader, layout: Layout, i: int) -> dict:
    """{checkpoint name: tensor} of layer i as it is now in the model, plus the tensors copied through."""
    current = model.state_dict(keep_vars=True)
    out = {c: current[m].detach() for m, c in layout.layers[i].items()}
    out.update(reader.read(layout.layer_extras[i]))
    return out


def _finish(work: Path, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to overwrite)")
    publish(work / "model", out)


def _first_inputs(model, reader: ShardReader, layout: Layout, calib, chunk: int, sink) -> list:
    """Capture the first layer's inputs into `sink` (embeddings read, then released); returns its kwargs."""
    load_tensors(model, reader, layout.rest)    # embeddings, positions: what runs before layer 0
    _, kwargs = capture_first_layer_inputs(model, calib, chunk, sink=sink)
    release(model, layout.rest)
    return kwargs


def _owl_pass(model, reader: ShardReader, layout: Layout, calib, recipe: Recipe, spill: Path, dev, chunk: int,
              targets, budget, progress: bool) -> dict:
    """OWL's outlier ratios from one pass of the calibration text through the dense layers, each read from
    its shards and released; returns the allocation (owl.owl_record)."""
    layers = models.decoder_layers(model)
    shape = (calib.shape[0], calib.shape[1], archs.arch_of(model).hidden_size(model.config))
    folder = spill / "owl"
    src, dst = activation_stores(shape, model.dtype, chunk, budget, folder)
    kwargs = _first_inputs(model, reader, layout, calib, chunk, src)
    ratios, counts = [], []
    bar = LayerBar(len(layers), "outlier ratios (owl, streamed)", dev, progress)
    for i, layer in enumerate(layers):
        load_tensors(model, reader, layout.layers[i], dev)
        _, ratio, count = layer_outlier_ratio(layer, layer_modules(model, i, targets), src, kwargs,
                                              recipe.owl_threshold, dev, out=dst)
        release(model, layout.layers[i])
        src, dst = dst, src
        ratios.append(ratio)
        counts.append(count)
        bar.step()
    bar.close()
    del src, dst
    shutil.rmtree(folder, ignore_errors=True)
    return owl_record(recipe, ratios, counts)


def _run_layers(model, reader: ShardReader, layout: Layout, calib, recipe: Recipe, state: dict, work: Path,
                spill: Path, dev, one_pass: bool, chunk: int, targets, budget, progress: bool, after_layer=None):
    """Prune layers state["done"].. in turn, each read, pruned, written as its shard and released; state.json
    records every finished layer. Returns the activation stores (None without calibration).
    after_layer: the driver's hook (prune_model); its dense chain gets two stores of its own (in RAM when
    all four fit the budget, else files in spill/dense) and is saved with the resume state."""
    layers = models.decoder_layers(model)
    n_layers = len(layers)
    n_shards = n_layers + 1 + (1 if layout.head else 0)
    built = work / "model"
    start, stats, layer_log = state["done"], state["stats"], state["layers"]
    src = dst = None
    kwargs = []
    if recipe.pruner.needs_calibration and start < n_layers:
        hidden_size = archs.arch_of(model).hidden_size(model.config)
        shape = (calib.shape[0], calib.shape[1], hidden_size)
        src, dst = activation_stores(shape, model.dtype, chunk, budget, spill)
        if state["acts"] and src.path is not None and Path(state["acts"]) == dst.path:
            src, dst = dst, src                    # the saved hidden states are in the second file
        sink = dst if (state["acts"] and src.path is not None) else src
        kwargs = _first_inputs(model, reader, layout, calib, chunk, sink)
        if state["acts"] and src.path is None:
            src.load(state["acts"])                # the hidden states after the last finished layer
        if after_layer is not None:
            half = None if budget is None else budget // 2
            after_layer.begin(src, activation_stores(shape, model.dtype, chunk, half, spill / "dense"),
                              saved=state.get("recovery") if state["acts"] else None)

    bar = LayerBar(n_layers, f"pruning ({recipe.method}, streamed)", dev, progress, initial=start)
    for i in range(start, n_layers):
        w0, c0 = time.perf_counter(), time.process_time()
        load_tensors(model, reader, layout.layers[i], dev)
        load_s = time.perf_counter() - w0
        mods = layer_modules(model, i, targets)
        if after_layer is not None:
            after_layer.before(i, layers[i], src, kwargs, dev)
        result, timing = prune_layer(layers[i], mods, src, kwargs,
                                     layer_recipe(recipe, state.get("allocation"), i), stats, one_pass, dev, out=dst)
        if after_layer is not None:
            result, timing["recovery"] = after_layer.after(i, layers[i], mods, src, kwargs, dev, result, out=dst,
                                                           stats=stats)
        w1 = time.perf_counter()
        write_shard(built / shard_name(i + 2, n_shards), _layer_tensors(model, reader, layout, i))
        release(model, layout.layers[i])
        if result is not None:
            src, dst = dst, src
            if src.path is None:                   # in RAM: keep a copy on disk for --resume
                saved = work / f"acts-{i % 2}.bin"
                src.save(saved)
                state["acts"] = str(saved)
            else:
                state["acts"] = str(src.path)
            if after_layer is not None:
                state["recovery"] = after_layer.checkpoint(work, i)
        w2 = time.perf_counter()
        layer_log.append({"layer": i, **timing, "load_s": load_s, "write_s": w2 - w1,
                          "step_wall_s": w2 - w0, "step_cpu_s": time.process_time() - c0,
                          "peak_gib": peak_rss_gib()})
        state["done"] = i + 1
        _write_state(work, state)
        bar.step(hook_note(timing))
    bar.close()
    return src, dst


@torch.no_grad()
def stream_prune(folder, out, recipe: Recipe, force: bool = False, resume: bool = False, device="cpu",
                 offload=None, activation_budget: int | None = ACTIVATION_BUDGET, batch: int = 8,
                 one_pass: bool | None = None, progress: bool = True, log=print, source=None,
                 after_layer=None) -> dict:
    """Prune the safetensors model folder `folder` into `out`, one layer at a time. Returns the metadata.

    after_layer: a hook run around each layer's prune (see prune_model); with it the metadata gets its
    `recovery` record from after_layer.meta()."""
    recipe.validate()
    folder, out = Path(folder), Path(out)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to overwrite)")
    needs_data = recipe.pruner.needs_calibration
    if needs_data:
        if str(recipe.calib) == "self":
            raise UserError("--calib self needs the whole model in memory (use --no-stream)")
        data.check_source(recipe.calib)
    with Timer() as t_load:
        reader = ShardReader(folder)
        model = skeleton(folder, reader)
        layers = models.decoder_layers(model)   # unsupported architecture: fail here
        check_group_widths(model, models.prunable_names(model, recipe.ignore), recipe.group_size)
        layout = Layout(model, reader)
        tokenizer = models.folder_tokenizer(folder)
    with Timer() as t_calib:
        calib = (data.calibration_windows(recipe.calib, tokenizer, recipe.nsamples, recipe.seqlen, recipe.seed)
                 if needs_data else None)
    one_pass, mode = calibration_mode(model, recipe, calib.numel() if needs_data else 0, one_pass)
    chunk = (calib.shape[0] if one_pass else batch) if needs_data else batch
    targets = set(models.prunable_names(model, recipe.ignore))
    work = work_dir(out)
    spill = Path(offload) / work.name if offload else work
    if offload:
        _check_writable(Path(offload))
    _check_writable(out.parent)
    fingerprint = _fingerprint(folder, reader, recipe, calib, dev, chunk, after_layer)

    state = _read_state(work) if work.exists() else None
    if resume and state is not None and state.get("fingerprint") != fingerprint:
        raise UserError(f"{work} is the work folder of a different run (other model, recipe, data or device); "
                        "run without --resume to start over")
    if resume and state is None:
        log(f"nothing to resume at {work}; starting from the first layer")
    if not resume or state is None:
        shutil.rmtree(work, ignore_errors=True)   # a stale work folder: start over
        if offload:
            shutil.rmtree(spill, ignore_errors=True)
        state = None
    (work / "model").mkdir(parents=True, exist_ok=True)

    n_layers = len(layers)
    n_shards = n_layers + 1 + (1 if layout.head else 0)
    built = work / "model"
    if state is None:
        # the tensors that are not in a layer are copied through first: shard 1 (and the head: the last)
        write_shard(built / shard_name(1, n_shards),
                    reader.read(list(layout.rest.values()) + layout.rest_extras))
        if n_shards == n_layers + 2:
            write_shard(built / shard_name(n_shards, n_shards), reader.read(list(layout.head.values())))
        state = {"fingerprint": fingerprint, "done": 0, "stats": {}, "layers": [], "acts": None}
        _write_state(work, state)
    start = state["done"]
    stats, layer_log = state["stats"], state["layers"]
    built = work / "model"
    log(f"streaming {folder} ({archs.model_type(model)}, {n_layers} layers) on {dev}"
        + (f"; resuming after layer {start - 1}" if start else ""))

    with Timer() as t_owl:
        if recipe.allocation == "owl" and not state.get("allocation"):
            try:
                state["allocation"] = _owl_pass(model, reader, layout, calib, recipe, spill, dev, chunk, targets,
                                                activation_budget, progress)
            except UserError:
                if not state["done"]:
                    shutil.rmtree(work, ignore_errors=True)   # nothing pruned yet: no work to keep
                raise
            _write_state(work, state)
    try:
        with Timer() as t_prune:
            src, dst = _run_layers(model, reader, layout, calib, recipe, state, work, spill, dev, one_pass,
                                   chunk, targets, activation_budget, progress, after_layer)
    except BaseException:
        log(f"stopped: the work so far is kept in {work}; run again with --resume to continue")
        raise

    meta = pruned_meta(model, recipe, stats, mode, dev, layer_log,
                       {"load_s": t_load.wall, "calibration_data_s": t_calib.wall,
                        "prune_wall_s": t_owl.wall + t_prune.wall, "prune_cpu_s": t_owl.cpu + t_prune.cpu,
                        **({"allocation_s": t_owl.wall} if recipe.allocation == "owl" else {})},
                       source or folder, allocation=state.get("allocation"),
                       streamed=True,
                       activations="ram" if src is None or src.path is None else "file",
                       resumed_at_layer=start or None,
                       **({"recovery": after_layer.meta(recipe, calib, layer_log)} if after_layer is not None else {}))
    _save_files(model, tokenizer, folder, built)
    _write_index(built)
    write_json(built / META_FILE, meta)
    _finish(work, out, force)
    shutil.rmtree(work, ignore_errors=True)
    if offload:
        shutil.rmtree(spill, ignore_errors=True)
    log(f"pruned {len(stats)} matrices to {meta['pruned_sparsity']:.1%} sparsity in "
        f"{meta['timing']['prune_wall_s']:.1f}s wall / {meta['timing']['prune_cpu_s']:.1f}s CPU; peak memory {meta['peak_memory_gib']:.2f} GiB")
    log(f"wrote {out}")
    return meta
