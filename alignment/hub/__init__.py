"""Where a base comes from: the tiny offline model, a .gguf file, a local directory, the hub or its local cache."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from alignment.errors import ModelLoadError
from alignment.files import cache_dir
from alignment.hub.gguf import gguf_source, is_gguf
from alignment.hub.tiny import TINY, build_tiny_model


def resolve_base(base: str, revision: str | None = None) -> str:
    """What to load from: a local directory, or the hub name when the hub can be reached.

    Without the hub, a name found in the local Hugging Face cache resolves to its snapshot directory, so nothing
    after this tries the network (and waits through its retries); a name not there fails at once.
    """
    if base == TINY:
        return str(build_tiny_model())
    if is_gguf(base):  # a llama.cpp file, or a model a Python package ships: converted once, then a directory
        return str(gguf_source(base, cache_dir()))
    path = Path(base).expanduser()
    if path.exists():
        check_model_dir(base, path)
        return str(path)
    if looks_like_path(base):  # not a hub name: saying "not in the Hugging Face cache" would mislead
        raise ModelLoadError(f"--model.base {base}: no such directory")
    if hub_reachable():
        return base
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, revision=revision, local_files_only=True)
    except Exception as err:  # not cached, or not even a valid repo id: the same answer for the user
        raise ModelLoadError(
            f"cannot load model {base!r}: it is not a local directory and is not in the Hugging Face cache, "
            "and the hub cannot be reached (offline, or HF_HUB_OFFLINE=1). Download it on a machine with network "
            f"(`hf download {base} --local-dir DIR`) and pass the local copy: --model.base DIR"
        ) from err


def looks_like_path(base: str) -> bool:
    """A path, not a hub name (`org/name`): starts like one, has more than one `/`, or has the OS's own separator."""
    return base.startswith(("/", ".", "~")) or base.count("/") > 1 or (os.sep != "/" and os.sep in base)


def check_model_dir(base: str, path: Path) -> None:
    """One clear line for a local base that is not a model: a file, an empty directory, a PEFT adapter."""
    if not path.is_dir():
        raise ModelLoadError(f"--model.base {base}: a file, not a model directory (or a .gguf file)")
    if not any(path.iterdir()):
        raise ModelLoadError(
            f"--model.base {base}: the directory is empty; it should hold a model (config.json, "
            "weights, tokenizer), e.g. from `hf download NAME --local-dir DIR`"
        )
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            named = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            named = None
        raise ModelLoadError(
            f"--model.base {base}: this is a PEFT adapter, not a base model; its base is named in "
            f"{adapter_config} (base_model_name_or_path: {named!r}): pass that as --model.base"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--model.base {base}: no config.json in this directory: it is not a model directory")


def hub_reachable() -> bool:
    """Whether the hub answers; asked once per process (start-up checks the model and the data several times)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return _answers(endpoint.hostname or "huggingface.co", port)


@functools.lru_cache(maxsize=8)
def _answers(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
