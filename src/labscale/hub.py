"""Is the Hugging Face hub reachable? Checked once per process, so offline machines fail fast instead of
spending ~25 s in huggingface_hub's retries before every error."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not resolve."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
