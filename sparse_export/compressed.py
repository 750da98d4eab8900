"""compressed-tensors checkpoints (sparse-24-bitmask / sparse-bitmask / dense)."""

import json
from pathlib import Path


def is_compressed_folder(folder):
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        c = json.loads(cfg.read_text())
    except ValueError:
        return False
    return bool(c.get("compression_config") or c.get("quantization_config", {}).get("sparsity_config"))


def load_compressed(folder, dtype="auto"):
    from .errors import UserError

    raise UserError(f"{folder} is a compressed-tensors folder; reading it is not implemented yet")
