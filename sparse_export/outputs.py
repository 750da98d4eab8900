"""Atomic output folders, the run metadata written beside every artifact, and facts about this
machine and process (library versions, CPU name, peak memory, CPU time)."""

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

META_FILE = "sparse_export.json"


@contextlib.contextmanager
def atomic_dir(out, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    Nothing is left at `out` after a failure or Ctrl-C. An existing `out` is replaced only
    with `force`, and only once the new folder is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output gets the user's usual mode
    try:
        yield tmp
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(built, out) -> None:
    """Rename the finished folder `built` to `out` (modes per the umask); an existing `out` is replaced
    only once the new folder is in place."""
    built, out = Path(built), Path(out)
    apply_umask(built)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        built.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(out)


def apply_umask(folder) -> None:
    """Give every folder and file below `folder` the mode the user's umask asks for (0755 / 0644 by
    default): some writers (safetensors, mkdtemp) create theirs 0600 / 0700, unreadable to a service."""
    mask = current_umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path, obj) -> None:
    """JSON with 2-space indents; the parent folder is created when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_meta(folder) -> dict:
    p = Path(folder) / META_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ["sparse-export", "torch", "transformers", "onnx", "onnxruntime", "deepsparse",
                 "numpy", "compressed-tensors"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def peak_rss_gib(field: str = "VmHWM") -> float:
    """Peak resident memory of this process so far, in GiB (field="VmRSS": the current one).

    VmHWM belongs to this program's address space; ru_maxrss is inherited across fork+exec, so a
    child started by a large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Wall and CPU seconds of a block: `with Timer() as t: ...; t.wall, t.cpu`."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_name() -> str | None:
    """'model name (N logical cores)' from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"model name\s*:\s*(.+)", text)
    return f"{m.group(1).strip() if m else 'unknown'} ({os.cpu_count()} logical cores)"


def relocate(obj, tmp, final=None) -> object:
    """A copy of the JSON-able `obj` where every path inside the temporary folder `tmp` points where it
    will be after the rename: relative to the output folder (final None), or under `final`."""
    roots = sorted({str(Path(tmp)), str(Path(tmp).resolve())}, key=len, reverse=True)

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [move(v) for v in x]
        if isinstance(x, str):
            for root in roots:
                if x == root or x.startswith(root + os.sep):
                    rest = x[len(root):].lstrip(os.sep) or "."
                    return rest if final is None else str(Path(final) / rest)
        return x

    return move(obj)


def relocate_meta_files(tmp, final) -> None:
    """relocate() every sparse_export.json below the temporary folder `tmp` to the final folder's paths."""
    for path in Path(tmp).rglob(META_FILE):
        write_json(path, relocate(json.loads(path.read_text()), tmp, final))
