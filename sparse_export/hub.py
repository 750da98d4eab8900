"""Whether the Hugging Face hub can be reached, asked once and quickly, so that a machine without
network gets one clear line instead of minutes of retries."""

import functools
import os
import socket
from urllib.parse import urlparse

from .errors import UserError

CONNECT_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or a TCP connection to the hub (HF_ENDPOINT) fails within
    CONNECT_TIMEOUT_S."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def require_hub(what: str, instead: str) -> None:
    """UserError naming `what` needed the hub and what to pass `instead`, when the hub is unreachable."""
    if not hub_reachable():
        raise UserError(f"{what} needs the Hugging Face hub, which is not reachable from here (offline, or "
                        f"HF_HUB_OFFLINE is set); {instead}")


def go_offline() -> None:
    """Tell huggingface_hub / transformers not to try the network (no retries, cache only)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
