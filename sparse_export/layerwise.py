"""Running a causal LM one decoder layer at a time: the device, the inputs of the first layer, the hidden
states between layers (in RAM, or in a memory-mapped file past a budget), the model's own head on the
last layer's outputs, and the progress bar over layers. Pruning and evaluation share these."""

from pathlib import Path

import numpy as np
import torch

from . import models
from .errors import UserError
from .outputs import peak_rss_gib
from .progress import progress as progress_bar

ACTIVATION_BUDGET = 2 * 2**30   # bytes of hidden states (inputs and outputs of a layer) kept in RAM


def pick_device(spec: str | None = "cpu") -> torch.device:
    """cpu | cuda | cuda:N | auto (cuda when present). UserError for CUDA without one."""
    spec = (spec or "cpu").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device '{spec}' (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"unsupported device '{spec}' (use cpu, cuda, cuda:N or auto)")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available here (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def to_device(obj, device) -> object:
    """Tensors inside obj (nested tuples, lists, dicts) moved to `device`; a no-op for tensors already there."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(total) in steps of `size`."""
    return [(s, min(s + size, total)) for s in range(0, total, size)]


class _Stop(Exception):
    pass


def layer_out(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(layer, hidden, kwargs: list, device, out=None) -> object:
    """`layer` over every chunk of `hidden` (each sent to `device` with its kwargs); the outputs, on the host,
    go to `out` (a store) when given and it is returned, else they are returned as a list."""
    results = []
    for i, kw in enumerate(kwargs):
        h = layer_out(layer(to_device(hidden[i], device), **to_device(kw, device))).to("cpu")
        if out is None:
            results.append(h)
        else:
            out[i] = h
    return results if out is None else out


@torch.no_grad()
def capture_first_layer_inputs(model, ids: torch.Tensor, batch: int, sink=None) -> tuple[list, list]:
    """Hidden states entering decoder layer 0 (all samples) and its keyword arguments per chunk.

    With `sink` (an Activations store), chunk i goes to sink[i] instead of the returned list."""
    layers = models.decoder_layers(model)
    hidden, kwargs = [], []

    def grab(module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        if sink is None:
            hidden.append(h)
        else:
            sink[len(kwargs)] = h
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        kwargs.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for s, e in chunks(ids.shape[0], batch):
            try:
                model(input_ids=ids[s:e], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


class Activations:
    """Hidden states of all samples [n, seqlen, hidden] between two layers, addressed by chunk of samples.

    In RAM, or (path given) in a file read and written one chunk at a time through a memory map that
    lives only while the chunk is copied, so the file never counts as resident memory.
    """

    def __init__(self, shape, dtype: torch.dtype, batch: int, path=None):
        self.shape, self.dtype, self.spans = tuple(shape), dtype, chunks(shape[0], batch)
        self.path = Path(path) if path else None
        self.row = int(np.prod(self.shape[1:])) * torch.empty((), dtype=dtype).element_size()
        if self.path is None:
            self.data = torch.empty(self.shape, dtype=dtype)
        else:
            if not self.path.exists() or self.path.stat().st_size != self.row * self.shape[0]:
                with open(self.path, "wb") as f:
                    f.truncate(self.row * self.shape[0])

    def __len__(self):
        return len(self.spans)

    def _map(self, i, mode):
        s, e = self.spans[i]
        return np.memmap(self.path, dtype=np.uint8, mode=mode, offset=s * self.row, shape=((e - s) * self.row,))

    def __getitem__(self, i) -> torch.Tensor:
        s, e = self.spans[i]
        if self.path is None:
            return self.data[s:e]
        mm = self._map(i, "r")
        raw = torch.from_numpy(np.array(mm))
        del mm
        return raw.view(self.dtype).view((e - s,) + self.shape[1:])

    def __setitem__(self, i, value: torch.Tensor):
        s, e = self.spans[i]
        value = value.detach().to("cpu", self.dtype)
        if self.path is None:
            self.data[s:e].copy_(value)
            return
        mm = self._map(i, "r+")
        mm[:] = value.contiguous().view(torch.uint8).reshape(-1).numpy()
        mm.flush()
        del mm

    def save(self, path) -> None:
        """Write all chunks to a file (what a memory-mapped store reads back)."""
        other = Activations(self.shape, self.dtype, self.spans[0][1] - self.spans[0][0], path)
        for i in range(len(self)):
            other[i] = self[i]

    def load(self, path) -> None:
        """Fill this store from a file written by save() or by a memory-mapped store."""
        other = Activations(self.shape, self.dtype, self.spans[0][1] - self.spans[0][0], path)
        for i in range(len(self)):
            self[i] = other[i]


def activation_stores(shape, dtype, batch: int, budget: int | None, folder) -> tuple[Activations, Activations]:
    """Two stores (a layer's inputs and outputs): in RAM when both fit in `budget` bytes, else files in `folder`."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if budget is None or 2 * nbytes <= budget:
        return Activations(shape, dtype, batch), Activations(shape, dtype, batch)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write activations to {folder} ({e.strerror or type(e).__name__})") from None
    return (Activations(shape, dtype, batch, folder / "acts-a.bin"),
            Activations(shape, dtype, batch, folder / "acts-b.bin"))


class LayerBar:
    """One progress bar over layers: time left from tqdm, peak memory so far in the postfix."""

    def __init__(self, total: int, desc: str, device: torch.device, progress: bool = True, initial: int = 0):
        self.device = device
        self.bar = progress_bar(total, desc, unit="layer", enabled=progress, initial=initial)

    def step(self, note: str = "") -> None:
        text = (note + ", " if note else "") + f"peak {peak_rss_gib():.2f} GiB"
        if self.device.type == "cuda":
            text += f", GPU {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def head_logits(model, ids: torch.Tensor, hidden: torch.Tensor, returns_tuple: bool) -> torch.Tensor:
    """Logits of the model's own head (final norm, projections, LM head) on the last layer's outputs.

    The model's forward runs with every decoder layer replaced: the first returns `hidden`, the
    others pass it on, so the head is exactly the code the whole model runs. returns_tuple: whether
    the real layers return a tuple (what the model's loop expects)."""
    layers = models.decoder_layers(model)
    probe = {}

    def first(*args, **kw):
        return probe["wrap"](hidden)

    def rest(*args, **kw):
        h = args[0] if args else kw["hidden_states"]
        return probe["wrap"](layer_out(h) if isinstance(h, (tuple, list)) else h)

    probe["wrap"] = (lambda h: (h,)) if returns_tuple else (lambda h: h)
    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else rest
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for layer in layers:
            del layer.forward


def buffers_to(model, device) -> None:
    """Move the buffers that are not saved (rotary tables) to `device`."""
    for name, buf in list(model.named_non_persistent_buffers()):
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf.to(device)
