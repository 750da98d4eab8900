"""Run one function in a child process, so that an engine crash ends that call, not the whole job.

DeepSparse 1.8 (end of life) segfaults on some graphs: here, KV-cache graphs of small models with
more than one core. In the child such a crash becomes a one-line UserError in the parent.

  python -m sparse_export.isolate MODULE:FUNCTION ARGS.json OUT.json   (what `call` runs)
"""

import importlib
import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import EngineCrash, UserError


def call(target: str, kwargs: dict, what: str, hint: str = "", child: bool = True, stdout: bool = False) -> Any:
    """target(**kwargs) in a fresh Python; kwargs and the result must be JSON. `what` names the work.
    child=False: call it here instead (engines that need no isolation). stdout: the child writes to this
    process's standard output (text it streams) instead of nowhere."""
    if not child:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(**kwargs)
    with tempfile.TemporaryDirectory(prefix="sparse-export-child-") as tmp:
        args, out = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args.write_text(json.dumps(kwargs, default=str))
        if stdout:
            sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-m", "sparse_export.isolate", target, str(args), str(out)],
                              stdout=None if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        result = json.loads(out.read_text()) if out.is_file() else None
    if result is not None and "user_error" in result:
        raise UserError(result["user_error"])
    if result is not None and proc.returncode == 0:
        return result["value"]
    crash = re.search(r"Received signal: ([^(\n]+)", proc.stderr)  # DeepSparse's handler, then exit 1
    if proc.returncode < 0 or crash:
        name = crash.group(1).strip() if crash else signal.Signals(-proc.returncode).name
        raise EngineCrash(f"{what} crashed ({name}){'; ' + hint if hint else ''}")
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    raise RuntimeError(f"{what} failed (exit {proc.returncode}): {last[-1] if last else 'no message'}")


def _child(target, args_path, out_path):
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    try:
        value = fn(**json.loads(Path(args_path).read_text()))
    except UserError as e:
        Path(out_path).write_text(json.dumps({"user_error": str(e)}))
        return 0
    Path(out_path).write_text(json.dumps({"value": value}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:4]))
