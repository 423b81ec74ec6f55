"""Resolving a model source named by a user: a local folder, or a Hugging Face hub name that can be had.

transformers retries an unreachable hub for close to a minute and then fails with a traceback; a name that is
neither a folder here, nor in the local hub cache, nor reachable is refused at once with a message instead.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache


def looks_local(name: str) -> bool:
    """Hub names are `name` or `org/name`; anything else (absolute, relative with ./, deeper) is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def hub_reachable(timeout: float = 3.0) -> bool:
    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(name: str, what: str) -> str:
    """`name` if it is a local folder, a cached hub model or a hub name while the hub is reachable; else a clear
    error. `what` names the source in messages (e.g. "model.llm", "--tokenizer")."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if looks_local(name):
        raise FileNotFoundError(f"{what} {name}: no such folder (a local path; hub names look like org/name)")
    if isinstance(try_to_load_from_cache(name, "config.json"), str) or isinstance(
        try_to_load_from_cache(name, "tokenizer_config.json"), str
    ):
        return name
    if not hub_reachable():
        raise ValueError(
            f"{what} {name!r} is neither a folder here nor in the local Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) cannot be reached: download it where there is network "
            f"(huggingface-cli download {name} --local-dir DIR) and pass the folder"
        )
    return name


__all__ = ["hub_reachable", "looks_local", "resolve_source"]
