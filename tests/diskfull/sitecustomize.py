"""A disk that fills up during training, for the tests: put this directory on PYTHONPATH and set DISKFULL_DIR (a
run directory) and DISKFULL_AFTER_STEP (optimizer steps). After that many steps every new file, write-mode open and
fsync under DISKFULL_DIR fails with ENOSPC, as on a full file system; reads and renames still work."""

import builtins
import errno
import os

_DIR = os.environ.get("DISKFULL_DIR")
_AFTER = int(os.environ.get("DISKFULL_AFTER_STEP", "0"))
_steps = 0


def _full(path) -> bool:
    if _steps < _AFTER or not isinstance(path, (str, bytes, os.PathLike)):
        return False
    return os.path.abspath(os.fsdecode(path)).startswith(os.path.abspath(_DIR) + os.sep)


def _no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


if _DIR:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def _count_step(optimizer, args, kwargs) -> None:
        global _steps
        _steps += 1

    register_optimizer_step_post_hook(_count_step)
    _open, _os_open, _fsync = builtins.open, os.open, os.fsync

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _full(file):
            raise _no_space(file)
        return _open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _full(path):
            raise _no_space(path)
        return _os_open(path, flags, *args, **kwargs)

    def fsync(fd) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else None
        if path is not None and _full(path):
            raise _no_space(path)
        _fsync(fd)

    builtins.open, os.open, os.fsync = open_, os_open, fsync
