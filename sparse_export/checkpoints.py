"""Safetensors model folders read one tensor group at a time, and written one shard at a time.

A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`. ShardReader
reads the headers once and opens a shard (safetensors.safe_open, memory-mapped) only while tensors are
read from it, so nothing stays mapped after the tensors are released. `skeleton` builds the model on
the `meta` device (no weights), with the buffers that are not saved (rotary tables) computed for real;
`load_tensors` / `release` move one module between the shards and `meta`.
"""

import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from . import archs, models
from .errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def shard_name(k: int, n: int) -> str:
    """save_pretrained's name of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (dtype, shape, byte range of every tensor)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            head = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    head.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in head.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end})")
    return head


def shard_tensors(path) -> dict:
    """{name: header entry (dtype, shape, data_offsets)} of one safetensors file."""
    return _header(Path(path))


def has_safetensors(folder) -> bool:
    """Whether `folder` holds safetensors weights (a single file or an index)."""
    folder = Path(folder)
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def check_shards(model_spec) -> None:
    """For a local safetensors folder: every shard the index names is there and readable (one line if not)."""
    from .compressed_format import is_compressed_folder

    kind, where = models.resolve(model_spec)
    if kind == "folder" and has_safetensors(where) and not is_compressed_folder(where):
        ShardReader(where)


STREAM_ABOVE = 2 * 2**30  # bytes of weights from which a local folder streams by default


def streamable(model_spec, calib: str | None = None) -> bool:
    """Whether MODEL runs layer by layer from its shards by default: a local safetensors folder, not
    compressed-tensors, with more than STREAM_ABOVE bytes of weights. Smaller models load in memory as
    before (`--stream` streams them too). The shards are checked here (one line for a missing one).

    GGUF files, compressed folders and hub ids load in memory; so does `--calib self` (the model writes
    its own calibration text with the whole model)."""
    from .compressed_format import is_compressed_folder

    kind, where = models.resolve(model_spec)
    if kind != "folder" or is_compressed_folder(where) or str(calib) == "self" or not has_safetensors(where):
        return False
    reader = ShardReader(where)
    return sum(reader.nbytes(n) for n in reader.keys()) > STREAM_ABOVE


class ShardReader:
    """The tensors of a safetensors model folder: names, shapes and dtypes from the headers, values on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            pickled = [p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            what = f"only pickled weights ({pickled[0]})" if pickled else "no model.safetensors"
            raise UserError(f"{self.folder} has {what}; pickled weights are never loaded (convert to safetensors)")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise UserError(f"{self.folder}: shard {missing[0]} named in {INDEX_FILE} is missing")
        self.file_of, self.info = {}, {}
        for f in files:
            for name, meta in _header(self.folder / f).items():
                self.file_of[name] = f
                self.info[name] = meta
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if absent:
                raise UserError(f"{self.folder}: tensor {absent[0]} is not in shard {weight_map[absent[0]]}")
        self.files = files

    def keys(self) -> list[str]:
        return list(self.file_of)

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.info[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self.info[name]["data_offsets"]
        return end - start

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor (what dtype='auto' falls back to)."""
        for name in self.file_of:
            if self.dtype(name).is_floating_point:
                return self.dtype(name)
        return None

    def read(self, names) -> dict[str, torch.Tensor]:
        """{name: tensor} for `names`. Each shard is open only while its tensors are read; the tensors
        map the file lazily and release it when they are freed."""
        from safetensors import safe_open

        by_file = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(self.folder / f), framework="pt") as handle:
                for n in group:
                    out[n] = handle.get_tensor(n)
        return out


def write_shard(path, tensors: dict) -> None:
    """Write one safetensors shard under a temporary name, then rename it (a killed write leaves no shard)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def write_index(folder, weight_map: dict, total_size: int) -> None:
    """model.safetensors.index.json as save_pretrained writes it."""
    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(body, indent=2) + "\n")


# ---- the model skeleton


def config_dtype(config, reader: ShardReader) -> torch.dtype:
    """The dtype from_pretrained(dtype='auto') gives: the config's, else the first float tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype or reader.float_dtype() or torch.float32


def skeleton(folder, reader: ShardReader) -> nn.Module:
    """The causal LM of `folder` on the meta device, in eval mode, with its non-saved buffers computed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not read the config of {folder}: {first}") from None
    dtype = config_dtype(config, reader)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # non-persistent buffers (rotary tables) are not in the shards: build them as from_pretrained does
    for name, buf in list(model.named_non_persistent_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = torch.empty_like(buf, device="cpu")
            model._init_weights(module)
    return model.eval()


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """transformers' own renames from checkpoint names to model names ((regex, replacement); e.g. GPT-NeoX
    checkpoints store the head as `embed_out`), the plain renames only."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    out = []
    for rule in get_model_conversion_mapping(model):
        if isinstance(rule, WeightRenaming) and not getattr(rule, "scope_prefix", None):
            out += [(src, rule.target_patterns[0]) for src in rule.source_patterns]
    return out


def checkpoint_names(model: nn.Module, reader: ShardReader) -> dict[str, str]:
    """{model tensor name: checkpoint name} for every saved tensor found in the shards.

    A checkpoint may name tensors without the base-model prefix (`h.0...` for `transformer.h.0...`), or
    by a name transformers renames when it loads (`embed_out` for GPT-NeoX's `lm_head`)."""
    wanted = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "")
    rules = _renamings(model)
    out = {}
    for key in reader.keys():
        name = key
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        for candidate in (name, f"{prefix}.{name}" if prefix else None):
            if candidate in wanted and candidate not in out:
                out[candidate] = key
                break
    return out


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        keep = isinstance(value, nn.Parameter)  # a tied parameter: the same object, not a copy
        module._parameters[attr] = value if keep else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_tensors(model: nn.Module, reader: ShardReader, names: dict[str, str], device="cpu") -> None:
    """Read the model tensors `names` ({model name: checkpoint name}) into `model`, in the model's dtype."""
    current = model.state_dict(keep_vars=True)
    values = reader.read(names.values())
    for name, ckpt in names.items():
        value = values[ckpt]
        want = current[name].dtype
        if value.dtype != want and value.dtype.is_floating_point:
            value = value.to(want)
        _set(model, name, value.to(device))


def tie_missing(model: nn.Module) -> None:
    """Point tied parameters that are still on meta (the LM head of a tied model) at their source."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in tied.items():
        if target in params and params[target].is_meta and source in params and not params[source].is_meta:
            _set(model, target, params[source])


def release(model: nn.Module, names) -> None:
    """Put the model tensors `names` back on meta; their memory is freed once nothing else holds them."""
    current = model.state_dict(keep_vars=True)
    for name in names:
        _set(model, name, torch.empty_like(current[name], device="meta"))


class Layout:
    """Which tensors of a checkpoint belong to each decoder layer, to the LM head, and to the rest.

    layers[i], head, rest: {model name: checkpoint name}. Checkpoint tensors no model tensor maps to
    (buffers older versions saved) are listed by owner in layer_extras[i] and rest_extras: they are
    copied through as they are. A tied head that the checkpoint does not store is in no group."""

    def __init__(self, model: nn.Module, reader: ShardReader):
        names = checkpoint_names(model, reader)
        prefix = archs.arch_of(model).layers
        count = len(archs.arch_of(model).decoder_layers(model))
        self.layers = [{m: c for m, c in names.items() if m.startswith(f"{prefix}.{i}.")} for i in range(count)]
        head = model.get_output_embeddings()
        head_names = {f"{n}.{p}" for n, mod in model.named_modules() if mod is head
                      for p, _ in mod.named_parameters(recurse=False)} if head is not None else set()
        self.head = {m: c for m, c in names.items() if m in head_names}
        grouped = set(self.head).union(*self.layers)
        self.rest = {m: c for m, c in names.items() if m not in grouped}
        mapped = set(names.values())
        extras = [k for k in reader.keys() if k not in mapped]
        self.layer_extras = []
        for i, group in enumerate(self.layers):
            m, c = next(iter(group.items()))
            ckpt_prefix = c[:len(c) - (len(m) - len(f"{prefix}.{i}."))]
            self.layer_extras.append([k for k in extras if k.startswith(ckpt_prefix)])
        self.rest_extras = [k for k in extras if not any(k in e for e in self.layer_extras)]
