"""The Hugging Face Hub, offline: is a file cached, and can the Hub be reached at all (one quick DNS lookup)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from urllib.parse import urlparse


def cached(repo_id: str, filenames: Iterable[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply "not cached"
        return False


def unreachable() -> str | None:
    """Why the Hub cannot be reached, or None when it may be. Fails in milliseconds, where
    huggingface_hub's own retries take tens of seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot reach {host}: {e.strerror or e}"
    return None
