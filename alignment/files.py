"""Files the runs write: atomic writes (a reader sees the old file or the new one, never half of one), and the
check that a directory the user named can be written before anything is built."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from alignment.errors import ConfigError, ModelLoadError

ACCESS_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
# the names of the files every layer reads: PEFT's adapter directory, and a run directory's resolved config
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT writes, newest format first
RUN_CONFIG = "config.yaml"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a temp file beside `path`, flush it to disk, then rename it over `path`.

    The rename is atomic on one file system, which is why the temp file sits in the same directory; concurrent
    writers each rename a whole file of their own. A failure (or a kill) before the rename leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())  # temp files are private; the file it replaces may be shared
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def share_like_plain_writes(path: str | Path) -> None:
    """Give a directory written in private, and everything in it, the modes a plain write there would have given:
    0666 for files and 0777 for directories, less the umask (0644 / 0755 under the usual 022).

    `tempfile.mkdtemp` makes its directory 0700 and safetensors (0.8) writes its files 0600: a model, adapter or
    converted base staged that way and renamed into place would be unreadable to the group on a shared machine,
    unlike what `save_pretrained` into a plain directory gives. Links are left alone.
    """
    mask = _umask()
    path = Path(path)
    for item in [path, *path.rglob("*")]:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path, flag: str) -> None:
    """A ConfigError naming `flag` and `path` unless files can be created at `path` (made later if missing).

    Tries a file in the nearest directory that exists: `os.access` says yes to root on any file system, even a
    read-only one, and to anyone on a read-only mount of a writable directory.
    """
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:  # read-only, no permission, or a pseudo file system such as /proc
        where = "" if existing == target else f" ({existing} is not writable)"
        raise ConfigError(f"{flag} {path}: cannot write there{where}: {err.strerror}") from None


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole safetensors file (cut short by a failed copy or download, say), or None.

    Reads the header only (8 bytes of length, then JSON naming each tensor's byte range): the file must be exactly
    as long as the header says, which is what the safetensors loader checks too, there with a traceback.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > size - 8:
                return f"cut short: {size} bytes, less than its header alone"
            header = json.loads(file.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except OSError as err:
        return err.strerror or str(err)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not readable"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"cut short: {size} of its {expected} bytes"
    if size > expected:
        return f"{size} bytes where its header accounts for {expected}"
    return None


def check_safetensors(path: str | Path, then: str) -> None:
    """A ModelLoadError naming `path`, what is wrong with it and `then` (what to do), unless it is a whole
    safetensors file."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise ModelLoadError(f"{path} is damaged ({problem}): {then}")


def cache_dir() -> Path:
    """Where the tool keeps what it builds once: the tiny model, converted GGUF bases, reference log-probs."""
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))
