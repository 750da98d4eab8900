"""Streamed ONNX export: a safetensors model folder of any size exported one decoder layer at a time.

The graph comes from a trace of the model with one decoder layer (stream_trace.py), split at the layer's
boundary and repeated for every layer with per-layer names (layer_graph.py). The weights never meet in
memory: each layer is read from the shards, converted to float32 (or put on its int8 grid and quantized
with its own activation ranges, stream_int8.py), written into model.onnx.data in the layout the traced
graph reads (Linear weights transposed for MatMul), and released; model.onnx holds the graph only. The
embeddings are read before the layers, the final norm and head after them.

Checked: a few random tokens run through each layer in torch as it is read (the reference), then the
written graph runs them on ONNX Runtime. Where the engine holding every weight (CHECK_FACTOR x their
bytes) would pass the memory budget, the check runs the first CHECK_LAYERS layers and the head instead
(a second small graph reading the same data file). Sparsity is counted in the written file, one tensor
at a time (graph.weight_sparsity). docs/export-at-scale.md.
"""

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from .. import archs, compat, data, models
from ..checkpoints import Layout, ShardReader, config_dtype, has_safetensors, load_tensors, release, skeleton
from ..checkpoints import tie_missing
from ..errors import UserError
from ..layerwise import LayerBar, capture_first_layer_inputs, layer_out
from ..outputs import META_FILE, Timer, atomic_dir, library_versions, peak_rss_gib, read_meta, write_json
from ..pruning.grid import int_weight
from .graph import LOGITS, ONNX_FILE, OPSET, source_fields, sparsity_summary
from .graph import weight_sparsity
from .int8_calib import HEAD_ROWS, head_choice, head_is_tied, head_module
from .layer_graph import Template, io_for_layers, layer_nodes
from .stream_trace import full_name, homogeneous, trace_template
from .validate import (CHECK_BATCH, CHECK_TOKENS, LOGITS_TOLERANCE, compare, int8_tolerance, kv_graph_logits,
                       reference_output, validate_plain)

EXPORT_BUDGET = 8 * 2**30     # bytes the in-memory export may use; larger models stream by default
IN_MEMORY_FACTOR = 4.5        # in-memory export peak / fp32 weight bytes (measured 4.2: docs/export-at-scale.md)
CHECK_FACTOR = 2              # ONNX Runtime's peak running the check / bytes of weights it loads
CHECK_LAYERS = 2              # layers of the truncated check graph
INLINE_BYTES = 1024           # smaller initializers stay inside model.onnx (as graph.save_onnx does)
ALIGN = 4096                  # tensors in the data file start on page boundaries (engines can map them)
CHUNK = 64 * 2**20            # bytes converted at a time when a large tensor is written


# ---- when to stream

def fp32_weight_bytes(folder) -> int:
    """Bytes of the floating-point weights of a safetensors folder once converted to float32."""
    reader = ShardReader(folder)
    return sum(4 * reader.nbytes(n) // reader.dtype(n).itemsize for n in reader.keys()
               if reader.dtype(n).is_floating_point)


def local_folder(model_spec) -> Path | None:
    """The folder when MODEL is a local safetensors folder (not compressed-tensors), else None."""
    from ..compressed_format import is_compressed_folder

    kind, where = models.resolve(model_spec)
    if kind == "folder" and has_safetensors(where) and not is_compressed_folder(where):
        return Path(where)
    return None


def choose_stream(model_spec, stream: bool | None = None, budget: int = EXPORT_BUDGET) -> bool:
    """Whether `export onnx` streams MODEL: as told (--stream/--no-stream), else when it is a local
    safetensors folder whose in-memory export (IN_MEMORY_FACTOR x the float32 weights) passes `budget`."""
    folder = local_folder(model_spec)
    if stream and folder is None:
        raise UserError(f"--stream needs a local safetensors model folder; {model_spec} is exported in memory "
                        "(use --no-stream)")
    if stream is not None:
        return stream
    return folder is not None and IN_MEMORY_FACTOR * fp32_weight_bytes(folder) > budget


# ---- the data file

class DataFile:
    """model.onnx.data, written at explicit offsets; initializers point into it."""

    def __init__(self, path):
        import os

        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.offset = 0
        self.bytes = 0

    def close(self) -> None:
        import os

        os.ftruncate(self.fd, self.offset)
        os.close(self.fd)

    def _write(self, data, at: int) -> None:
        import os

        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def _place(self, t, nbytes: int) -> int:
        """Point initializer `t` at the next free (aligned) `nbytes` of the file; returns their offset."""
        from onnx import TensorProto

        start = self.offset + (-self.offset % ALIGN)
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", self.path.name), ("offset", str(start)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset = start + nbytes
        self.bytes += nbytes
        return start

    def put_proto(self, t) -> None:
        """Move an initializer's raw data into the file (small ones stay inline)."""
        from onnx import TensorProto, numpy_helper

        if t.data_location == TensorProto.EXTERNAL:
            return
        if not t.HasField("raw_data"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
        if len(t.raw_data) < INLINE_BYTES:
            return
        raw = t.raw_data
        t.ClearField("raw_data")
        self._write(raw, self._place(t, len(raw)))

    def put_tensor(self, name: str, tensor: torch.Tensor, transposed: bool, dims) -> object:
        """An initializer `name` holding `tensor` as float32 (transposed if asked), converted and written a
        band of CHUNK bytes at a time."""
        from onnx import TensorProto

        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
        w = tensor.detach()
        start = self._place(t, 4 * w.numel())
        if not transposed:
            flat = w.reshape(-1)
            step = CHUNK // 4
            for c in range(0, flat.numel(), step):
                self._write(flat[c:c + step].float().contiguous().numpy(), start + 4 * c)
            return t
        rows, cols = w.shape                       # written as cols x rows: a band of rows at a time
        if 4 * w.numel() <= CHUNK:
            self._write(w.float().t().contiguous().numpy(), start)
            return t
        step = max(1, CHUNK // (4 * cols))
        for r in range(0, rows, step):
            band = w[r:r + step].float().t().contiguous().numpy()       # cols x band
            for c in range(cols):
                self._write(band[c], start + 4 * (c * rows + r))
        return t


# ---- torch side: a few tokens through the layers, the model's own head after them

def _load(model, reader, group: dict) -> None:
    """load_tensors one tensor at a time (the stored copy of one tensor beside its float32 version)."""
    for m, c in group.items():
        load_tensors(model, reader, {m: c})


def _after_layers(run) -> dict:
    """The tensors outside the layers that the graph reads after them (final norm, head; the embedding of a
    tied head): {model name: checkpoint name}."""
    t = run.template
    read = {i for n in t.head for i in n.input}
    params = {s.param for n, s in run.sources.items() if n in read}
    group = {**run.layout.rest, **run.layout.head}
    return {m: c for m, c in group.items() if m in params}


def _placeholders(model, names) -> None:
    """Stand-ins for tensors only the part before the layers reads (embeddings), where torch replays the
    layers' outputs: zeros that take no memory (one value, expanded)."""
    state = model.state_dict(keep_vars=True)
    for name in names:
        if state[name].is_meta:
            owner, _, attr = name.rpartition(".")
            zeros = torch.zeros((), dtype=state[name].dtype).expand(state[name].shape)
            module = model.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(zeros, requires_grad=False)
            else:
                module._buffers[attr] = zeros


def _zeros(model, module: str) -> int:
    w = model.get_submodule(module).weight
    return w.numel() - int(torch.count_nonzero(w))


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed blocks below its mmap threshold, which
    rises to 32 MB: a layer's tensors of medium models would otherwise stay resident after release)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _capture(model, ids: np.ndarray) -> list:
    """[hidden states, keyword arguments] entering layer 0 for `ids` (one chunk)."""
    hidden, kwargs = capture_first_layer_inputs(model, torch.from_numpy(ids), ids.shape[0])
    return [hidden[0], kwargs[0]]


@contextlib.contextmanager
def _replayed(model, hidden: torch.Tensor, tuple_out: bool):
    """The model's forward with its decoder layers replaced: the first returns `hidden`, the others pass it
    on, so whatever follows the layers (norm, head, the logits variant) is the model's own code."""
    layers = models.decoder_layers(model)
    wrap = (lambda h: (h,)) if tuple_out else (lambda h: h)

    def first(*args, **kw):
        return wrap(hidden)

    def rest(*args, **kw):
        h = args[0] if args else kw["hidden_states"]
        return wrap(layer_out(h) if isinstance(h, (tuple, list)) else h)

    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else rest
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


# ---- the graph

def _real_dims(t, src, real: list, traced: list) -> list[int]:
    """Real dims of initializer `t` holding parameter src.param (shape `real`; `traced` in the one-layer
    model, whose vocabulary and MLP width are small)."""
    if src.transposed:
        return real[::-1]
    if list(t.dims) == traced:
        return real
    if traced == real:
        return list(t.dims)
    raise UserError(f"cannot size initializer {t.name}: it reshapes {src.param}, whose shape changes")


def assemble(t: Template, shared_inits: list, parts: list, n: int, vocab: int | None,
             head: list | None = None) -> object:
    """The graph with the first n layers of `parts` [(nodes, initializers)] and the head after them (the
    template's head nodes, or `head` in their place: the INT8 head's rewrite)."""
    from onnx import ModelProto, NodeProto

    proto = ModelProto()
    proto.ir_version = t.proto.ir_version
    proto.producer_name, proto.producer_version = t.proto.producer_name, t.proto.producer_version
    proto.opset_import.extend(t.proto.opset_import)
    g = proto.graph
    g.name = t.proto.graph.name
    g.node.extend(t.shared)
    for nodes, _ in parts[:n]:
        g.node.extend(nodes)
    last = t.rename(t.h_out, n - 1)
    for node in (t.head if head is None else head):
        c = NodeProto()
        c.CopyFrom(node)
        for j, name in enumerate(c.input):
            if name == t.head_in:
                c.input[j] = last
        g.node.append(c)
    g.initializer.extend(shared_inits)
    for _, inits in parts[:n]:
        g.initializer.extend(inits)
    g.input.extend(io_for_layers(t, t.proto.graph.input, n))
    g.output.extend(io_for_layers(t, t.proto.graph.output, n))
    if vocab:
        dims = g.output[0].type.tensor_type.shape.dim
        if len(dims) == 3 and dims[2].dim_value:
            dims[2].dim_value = vocab
    names = [o for node in g.node for o in node.output] + [i.name for i in g.initializer]
    if len(names) != len(set(names)):
        raise UserError("the assembled graph names a tensor twice")
    return proto


def _layer_part(t: Template, sources: dict, model, i: int, h_in: str, layers_prefix: str, prunable: set,
                trace_shapes: dict, datafile=None):
    """Layer i's nodes and initializers as a small ModelProto, and {initializer: module} for the Linear
    weights among them. With `datafile` the weights go straight into it (the initializers point there);
    without, they are float32 copies in the proto (for a graph rewrite first)."""
    from onnx import ModelProto, numpy_helper

    state = model.state_dict(keep_vars=True)
    names = {n: t.rename(n, i) for n in t.layer_inits}
    part = ModelProto()
    part.graph.node.extend(layer_nodes(t, i, h_in, names))
    modules = {}
    inits = {x.name: x for x in t.proto.graph.initializer}
    for n, new in names.items():
        src = sources[n]
        param = full_name(src.param, layers_prefix, i)
        w = state[param].detach()
        dims = _real_dims(inits[n], src, list(w.shape), trace_shapes[src.param])
        if datafile is not None and 4 * w.numel() >= INLINE_BYTES:
            part.graph.initializer.append(datafile.put_tensor(new, w, src.transposed, dims))
        else:
            w = w.float().t() if src.transposed else w.float()
            part.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.numpy()).reshape(dims), new))
        module = param.rsplit(".", 1)[0]
        if param.endswith(".weight") and module in prunable:
            modules[new] = module
    return part, modules


def _detached(messages) -> list:
    """Copies of protobuf messages that do not keep their parent message (and its memory) alive."""
    out = []
    for m in messages:
        c = type(m)()
        c.CopyFrom(m)
        out.append(c)
    return out


def _check_kv(path, ref: np.ndarray, ids: np.ndarray, n_layers: int, kv: int, d: int, max_length: int,
              tolerance: float = LOGITS_TOLERANCE) -> dict:
    """validate.validate_kv for a graph of n_layers: prompt, then one decode step, against `ref`."""
    n = ids.shape[1] - 1
    got = kv_graph_logits(path, ids, n_layers, kv, d, max_length)
    return {"runtime": "onnxruntime", "inputs": f"{n} random prompt tokens (seed 0) + 1 decode step",
            **compare(got, ref, tolerance, "the exported KV-cache graph on ONNX Runtime")}


def _save_files(model, tokenizer, src, dst, kind: str) -> None:
    model.config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    if kind == "kv":
        from transformers import GenerationConfig

        try:
            GenerationConfig.from_pretrained(src).save_pretrained(dst)
        except (OSError, ValueError):
            GenerationConfig.from_model_config(model.config).save_pretrained(dst)
    compat.portable_folder(dst)


# ---- the export

class _Run:
    """State of one streamed export (what the phases share)."""

    def __init__(self, folder, kind: str, logits: str, seqlen: int, max_length: int, int8: dict | None):
        self.folder, self.kind, self.logits, self.max_length, self.int8 = folder, kind, logits, max_length, int8
        self.quant = int8 is not None and kind in ("int8", "kv")      # int8 weights (the plain or KV-cache graph)
        self.reader = ShardReader(folder)
        self.model = skeleton(folder, self.reader)
        self.stored_dtype = config_dtype(self.model.config, self.reader)
        self.model.float()
        self.arch = archs.arch_of(self.model)
        self.layers = self.arch.decoder_layers(self.model)
        homogeneous(self.model)
        self.layout = Layout(self.model, self.reader)
        if kind == "kv":
            from .onnx_kv import check_supported

            check_supported(self.model, max_length)
        self.tokenizer = models.folder_tokenizer(folder)
        self.template, self.sources, self.trace_shapes = trace_template(
            self.model.config, "kv" if kind == "kv" else "plain", logits, seqlen)
        self.vocab = self.model.config.vocab_size

    def shared_param_group(self, param: str) -> str:
        if param in self.layout.rest:
            return "rest"
        if param in self.layout.head:
            return "head"
        raise UserError(f"{param} is not in the checkpoint of {self.folder}")


@torch.no_grad()
def export_streamed(model_spec, out, kind: str = "plain", logits: str = "last", seqlen: int = 16,
                    max_length: int = 2048, int8: dict | None = None, force: bool = False,
                    budget: int = EXPORT_BUDGET, progress: bool = True, log=print) -> dict:
    """Export the safetensors folder MODEL one layer at a time into the deployment folder `out`.

    kind: "plain" (with `logits`), "kv" (the KV-cache graph, `max_length`) or "int8" (plain, with `int8`:
    {calib, nsamples, seqlen, seed, percentile, outlier_ratio, attention, head} as onnx_int8.export_int8 takes
    them); "kv" with `int8`: the INT8 KV-cache graph (same calibration and rewrite, attention scores fp32).
    budget: bytes the check of the whole graph may use (else its first layers are checked). Writes
    the files and metadata the in-memory export writes, plus "streamed". Returns the metadata."""
    folder = local_folder(model_spec)
    if folder is None:
        raise UserError(f"the streamed export needs a local safetensors model folder; {model_spec} is not one")
    if logits not in LOGITS:
        raise UserError(f"unknown logits variant '{logits}' (choose from {', '.join(LOGITS)})")
    if kind not in ("plain", "kv", "int8"):
        raise UserError(f"unknown export kind '{kind}' (plain, kv or int8)")
    if seqlen < 2 or (kind == "kv" and max_length < 2):
        raise UserError("--seqlen and --max-length must be at least 2")
    quant = int8 is not None and kind in ("int8", "kv")
    t0 = time.perf_counter()
    cal = None
    if quant:
        from .onnx_int8 import check_int8_options, int8_calibration

        check_int8_options(int8.get("percentile"), int8.get("outlier_ratio"), None)   # no --max-error here

        cal = int8_calibration(model_spec, int8.get("calib"), int8.get("nsamples"), int8.get("seqlen"),
                               int8.get("seed"))
        if cal["source"] == "self":
            raise UserError("--calib self needs the whole model in memory (use --no-stream)")
        data.check_source(cal["source"])
    with Timer() as t_prep:
        run = _Run(folder, kind, logits, seqlen, max_length, int8)
    n_layers = len(run.layers)
    log(f"streaming {folder} ({archs.model_type(run.model)}, {n_layers} layers) into ONNX, one layer at a time")
    with atomic_dir(out, force) as tmp:
        datafile = DataFile(tmp / (ONNX_FILE + ".data"))
        try:
            result = _export_layers(run, datafile, cal, budget, progress, log)
        finally:
            datafile.close()
        proto, checked, extra = result
        import onnx

        onnx.save_model(proto, str(tmp / ONNX_FILE))
        validation = _validate(run, tmp, checked, extra)
        weights = weight_sparsity(tmp / ONNX_FILE)   # counted in the file, one tensor at a time
        _label(weights, extra)
        summary = sparsity_summary(weights)
        _save_files(run.model, run.tokenizer, folder, tmp, kind)
        meta = _meta(run, tmp, model_spec, summary, weights, validation, extra, seqlen,
                     {"prepare_s": t_prep.wall, "export_s": time.perf_counter() - t0})
        write_json(tmp / META_FILE, meta)
    log(f"exported {summary['prunable_matrices']} prunable matrices at {summary['prunable_sparsity']:.1%} sparsity "
        f"(counted in the ONNX file), streamed; peak memory {meta['streamed']['peak_memory_gib']:.2f} GiB; "
        f"ONNX Runtime within {validation['max_abs_diff']:.1e} of torch")
    log(f"wrote {out}")
    return meta


def _check_ids(run) -> tuple[np.ndarray, np.ndarray]:
    if run.kind == "kv":
        n = max(1, min(CHECK_TOKENS, run.max_length - 1))
        ids = data.random_tokens(run.vocab, 1, n + 1)[0]
        return ids, np.ones_like(ids)
    return data.random_tokens(run.vocab, CHECK_BATCH, CHECK_TOKENS)


def _export_layers(run: _Run, datafile: DataFile, cal: dict | None, budget: int, progress: bool, log):
    """Write every weight into `datafile` (embeddings, each layer, head) while a few tokens run through the
    layers in torch. Returns (the graph, the layers the check graph keeps, what the rest of the export needs)."""
    t, model, layout = run.template, run.model, run.layout
    n_layers = len(run.layers)
    written, shared_params = {}, {n: s for n, s in run.sources.items() if n not in t.layer_inits}
    extra = {"modules": {}, "zeros": {}}

    def write_one(name, src):
        x = next(i for i in t.proto.graph.initializer if i.name == name)
        dims = _real_dims(x, src, list(model.state_dict(keep_vars=True)[src.param].shape),
                          run.trace_shapes[src.param])
        written[name] = datafile.put_tensor(name, model.state_dict(keep_vars=True)[src.param], src.transposed, dims)

    # the INT8 head's weight is written after the layers, once its calibration says int8 or fp32
    head_node = _head_matmul(run) if run.quant and run.int8.get("head", True) else None

    def write_shared(group):
        for name, src in shared_params.items():
            if name not in written and run.shared_param_group(src.param) == group and \
                    (head_node is None or name != head_node.input[1]):
                write_one(name, src)

    # the tensors before the first layer: the embeddings' initializers, the first layer's inputs
    _load(model, run.reader, layout.rest)
    write_shared("rest")
    ids, mask = _check_ids(run)
    streams = {"fp32": _capture(model, ids)}
    calib = None
    if run.quant:
        from .int8_calib import recording_attention
        from .stream_int8 import LayerCalibration

        windows = data.calibration_windows(cal["source"], run.tokenizer, cal["nsamples"], cal["seqlen"],
                                           cal["seed"])
        calib = LayerCalibration(model, windows, read_meta(run.folder), run.stored_dtype, run.int8.get("percentile"),
                                 run.int8.get("outlier_ratio"), run.int8.get("attention", True))
        calib.capture()
        with recording_attention(model, calib.attention):
            streams["int8"] = _capture(model, ids)
    release(model, layout.rest)

    layer_bytes = sum(4 * p.numel() for p in run.layers.parameters()) // (4 if run.quant else 1)
    estimate = layer_bytes + sum(4 * p.numel() for p in model.parameters()) - 4 * sum(
        p.numel() for p in run.layers.parameters())
    check_layers = n_layers if CHECK_FACTOR * estimate <= budget else min(CHECK_LAYERS, n_layers)
    tuple_out = None
    parts, h_in = [], t.h_src
    int8_done, scales_all, qparams_all, attention_all = {}, {}, {}, {}
    prunable, attention = models.prunable_names(model), models.attention_names(model)
    bar = LayerBar(n_layers, "exporting (streamed)", torch.device("cpu"), progress)
    for i in range(n_layers):
        load_tensors(model, run.reader, layout.layers[i])
        layer = run.layers[i]
        prefix = f"{run.arch.layers}.{i}."
        names = [n for n in prunable if n.startswith(prefix)]
        attn_names = [n for n in attention if n.startswith(prefix)]
        if calib is not None:
            scales, qparams, attn, _ = calib.layer(i, names, attn_names)
            if run.kind == "kv":
                attn = {}               # the KV-cache graph keeps its score matmuls fp32 (onnx_kv.py)
            scales_all.update(scales)
            qparams_all.update(qparams)
            attention_all.update(attn)
        if i < check_layers:
            h, kw = streams["fp32"]
            out = layer(h, **kw)
            tuple_out = isinstance(out, (tuple, list))
            streams["fp32"][0] = layer_out(out)
            if calib is not None:
                from .int8_calib import fake_int8

                with fake_int8(model, qparams, attn):
                    streams["int8"][0] = layer_out(layer(*streams["int8"][:1], **streams["int8"][1]))
        part, modules = _layer_part(t, run.sources, model, i, h_in, run.arch.layers, set(names), run.trace_shapes,
                                    None if calib is not None else datafile)
        if calib is not None:
            from .onnx_int8 import quantize_attention, quantize_graph

            done = quantize_graph(part, model, scales, qparams)
            quantize_attention(part, attn)
            for module, row in done.items():
                int8_done[row["initializer"]] = module
                modules = {k: v for k, v in modules.items() if v != module}
                if row["zeros"] != _zeros(model, module):
                    raise UserError(f"{module}: zero count changed in the int8 export")
        for x in part.graph.initializer:
            datafile.put_proto(x)
        for name, module in modules.items():
            extra["zeros"][name] = _zeros(model, module)
        extra["modules"].update(modules)
        parts.append((_detached(part.graph.node), _detached(part.graph.initializer)))
        del part                    # its arena held the layer's float32 copy
        h_in = t.rename(t.h_out, i)
        release(model, layout.layers[i])
        _trim()
        bar.step()
    bar.close()

    # after the layers: the head's initializers, and the torch reference through the model's own head
    after = _after_layers(run)
    _load(model, run.reader, after)
    tie_missing(model)
    _placeholders(model, {**layout.rest, **layout.head}.keys() - after.keys())
    write_shared("head")
    head_nodes, head_inits, head_q = None, [], {}
    hn = head_module(model)
    tied = hn is not None and head_is_tied(model, hn)
    if calib is not None:
        def run_head(hidden):
            with _replayed(model, hidden, tuple_out):
                model(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long), use_cache=False)

        requested = head_node is not None
        head_s, head_q, head_entry = calib.head(hn if requested else None, run_head, tied, requested)
        if run.logits == "none":
            head_entry = head_choice(None, None, None, False) | {"reason": "logits=none: the graph has no LM head"}
        elif not requested:
            head_entry = head_choice(hn, None, None, tied, requested=False)
            if run.int8.get("head", True):
                head_entry["reason"] = "no LM head MatMul found in the traced graph"
        if head_q:
            head_nodes, head_inits, row = _int8_head(run, head_node, hn, head_s, head_q)
            for x in head_inits:
                datafile.put_proto(x)
            int8_done[row["initializer"]] = hn
            scales_all.update(head_s)
            qparams_all.update(head_q)
        elif head_node is not None:
            write_one(head_node.input[1], run.sources[head_node.input[1]])
        extra["head"] = head_entry
    missing = [n for n in shared_params if n not in written and not (head_q and n == head_node.input[1])]
    if missing:
        raise UserError(f"initializer {missing[0]} was not written")
    extra.update(_references(run, streams, ids, mask, tuple_out, head_q))
    release(model, {**layout.rest, **layout.head})

    shared_inits = []
    for x in t.proto.graph.initializer:
        if x.name in t.layer_inits or (head_nodes is not None and x.name == head_node.input[1]):
            continue
        if x.name in written:
            shared_inits.append(written[x.name])
        else:
            datafile.put_proto(x)        # a constant of the graph
            shared_inits.append(x)
    vocab = run.vocab if run.logits != "none" or run.kind == "kv" else None
    shared_inits += head_inits
    proto = assemble(t, shared_inits, parts, n_layers, vocab, head_nodes)
    extra.update(parts=parts, calibration=cal, shared_inits=shared_inits, vocab=vocab, ids=ids, mask=mask,
                 head_nodes=head_nodes,
                 int8_done=int8_done, scales=scales_all, qparams=qparams_all, attention=attention_all,
                 weight_source=calib.weight_source() if calib else None, data_bytes=datafile.bytes,
                 peak_memory_gib=peak_rss_gib())
    return proto, check_layers, extra


def _head_matmul(run: _Run):
    """The template's LM head MatMul / Gemm (reading the head weight, transposed), or None (no head)."""
    hn = head_module(run.model)
    if hn is None or run.logits == "none":
        return None
    emb = run.model.get_input_embeddings()
    params = {f"{hn}.weight"} | {f"{n}.weight" for n, m in run.model.named_modules() if m is emb}
    for node in run.template.head:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in run.sources:
            src = run.sources[node.input[1]]
            if src.param in params and src.transposed:
                return node
    return None


def _int8_head(run: _Run, node, module: str, scales: dict, qparams: dict) -> tuple[list, list, dict]:
    """The head's MatMul in the int8 form (onnx_int8.int8_matmul, as quantize_graph writes it in memory), its
    int8 weight read from the model's head (on its grid) a block of rows at a time: (the head's nodes with the
    rewrite in place, new initializers, quantize_graph's row for it). A float32 copy of an 8B model's head
    is 2.1 GB; this holds its int8 values and one block."""
    from .onnx_int8 import int8_matmul, int8_row

    w = run.model.get_submodule(module).weight.detach()
    scale = np.asarray(scales[module], np.float32)
    ints = np.empty(tuple(w.shape), np.int8)
    for r in range(0, w.shape[0], HEAD_ROWS):
        ints[r:r + HEAD_ROWS] = int_weight(w[r:r + HEAD_ROWS].float(), scale[r:r + HEAD_ROWS], name=module).numpy()
    rewritten, inits = int8_matmul(node, ints, scale, qparams[module], module, {})
    nodes = []
    for n in run.template.head:
        nodes += rewritten if n is node else [n]
    return nodes, inits, int8_row(module, node, ints)


def _references(run: _Run, streams: dict, ids: np.ndarray, mask: np.ndarray, tuple_out: bool,
                head_qparams: dict | None = None) -> dict:
    """Torch's output for the check tokens after the layers that ran (the model's own head; the int8 stream
    with the head's input fake-quantized when the head is int8)."""
    from .int8_calib import fake_quantized_inputs

    out = {}
    for name, (hidden, _) in streams.items():
        with _replayed(run.model, hidden, tuple_out), \
                fake_quantized_inputs(run.model, head_qparams if name == "int8" else {}):
            if run.kind == "kv":
                out[name] = run.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
            else:
                out[name] = reference_output(run.model, run.logits, ids, mask)
    return {"reference": out}


def _validate(run: _Run, tmp: Path, check_layers: int, extra: dict) -> dict:
    """Run the written graph (or its first check_layers layers: a small graph reading the same data file) on
    ONNX Runtime against the torch reference."""
    n_layers = len(run.layers)
    path = tmp / ONNX_FILE
    if check_layers < n_layers:
        import onnx

        path = tmp / "_check.onnx"
        onnx.save_model(assemble(run.template, extra["shared_inits"], extra["parts"], check_layers, extra["vocab"],
                                 extra["head_nodes"]), str(path))
    try:
        ref = extra["reference"]
        if run.kind == "kv":
            _, kv, d = run.arch.cache_shape(run.model.config)
            if run.quant:
                result = _check_kv(path, ref["int8"], extra["ids"], check_layers, kv, d, run.max_length,
                                   int8_tolerance(ref["int8"], ref["fp32"]))
            else:
                result = _check_kv(path, ref["fp32"], extra["ids"], check_layers, kv, d, run.max_length)
        elif run.kind == "int8":
            tol = int8_tolerance(ref["int8"], ref["fp32"])
            result = validate_plain(run.model, path, run.logits, reference=ref["int8"], tolerance=tol,
                                    inputs=(extra["ids"], extra["mask"]))
        else:
            result = validate_plain(run.model, path, run.logits, reference=ref["fp32"],
                                    inputs=(extra["ids"], extra["mask"]))
    except UserError:
        raise
    except Exception as e:          # the engine refused the graph (onnxruntime's own exception types)
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the exported graph fails on ONNX Runtime: {first}") from None
    finally:
        if path.name == "_check.onnx":
            path.unlink(missing_ok=True)
    result["reference"] = "torch, one layer at a time from the shards"
    result["layers_checked"] = check_layers
    if check_layers < n_layers:
        result["note"] = (f"the first {check_layers} of {n_layers} layers and the head (the whole graph's weights "
                          f"would not fit the memory budget)")
    return result


def _label(weights: dict, extra: dict) -> None:
    """Name the module of each prunable matrix (known from how the file was written); check its zeros."""
    for row in weights.values():
        row.update(module=None, prunable=False)
    for name, module in extra["modules"].items():
        weights[name].update(module=module, prunable=True)
        if name in extra["zeros"] and weights[name]["zeros"] != extra["zeros"][name]:
            raise UserError(f"{module}: the ONNX file holds {weights[name]['zeros']} zeros, the model "
                            f"{extra['zeros'][name]}")
    head = (extra.get("head") or {}).get("module")
    for name, module in extra["int8_done"].items():
        weights[name].update(module=module, prunable=module != head, op="MatMulInteger", transposed=True)


def _meta(run: _Run, folder: Path, source, summary: dict, weights: dict, validation: dict, extra: dict,
          seqlen: int, timing: dict) -> dict:
    config = run.model.config
    streamed = {"layers": len(run.layers), "template": "one decoder layer traced once, repeated per layer",
                "data_bytes": extra["data_bytes"], "peak_memory_gib": max(extra["peak_memory_gib"], peak_rss_gib()),
                **timing}
    common = {"format": "onnx", "opset": OPSET, "architecture": archs.model_type(run.model), **summary,
              "validation": validation, "weights": weights, "streamed": streamed,
              "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if run.kind == "kv":
        from .onnx_kv import kv_meta

        _, kv, d = run.arch.cache_shape(config)
        meta = {**kv_meta(config, len(run.layers), kv, d, run.max_length), "source_model": str(source), **common,
                "timing": {"load_s": timing["prepare_s"], "export_s": timing["export_s"]}}
        if run.quant:
            from .onnx_kv import kv_int8_fields

            meta["int8"] = kv_int8_fields(run.model, set(extra["int8_done"].values()), extra["scales"],
                                          extra["qparams"], extra["head"], _int8_extra(run, extra))
        return meta
    from .onnx_plain import plain_fields

    meta = {**plain_fields(config, run.logits, seqlen, True), **common, "export_s": timing["export_s"],
            **source_fields(source, folder)}
    if run.quant:
        from .onnx_int8 import int8_fields

        quantized = set(extra["int8_done"].values()) - {extra["head"]["module"]}
        fp32 = sorted(n for n in models.prunable_names(run.model) if n not in quantized)
        meta["int8"] = int8_fields(len(quantized), fp32, extra["scales"], extra["qparams"], extra["attention"],
                                   _int8_extra(run, extra), extra["head"])
    return meta


def _int8_extra(run: _Run, extra: dict) -> dict:
    """onnx_int8.int8_extra for this export: the options it was given, the prune's SmoothQuant alpha."""
    from .onnx_int8 import int8_extra

    o = run.int8
    return int8_extra(extra["weight_source"], extra["calibration"], o.get("percentile"), o.get("outlier_ratio"),
                      o.get("max_error"), (read_meta(run.folder).get("recipe") or {}).get("smooth"))
