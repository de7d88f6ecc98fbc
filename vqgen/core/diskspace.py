"""Failures of the machine rather than of the code: a full disk (or quota) and over-long paths, as one line.

:func:`disk_full_guard` turns a write that fails for lack of space, whatever the library's error looks like
(``OSError`` 28 from Python and PIL, safetensors' ``No space left on device (os error 28)``, ``torch.save``'s
``unexpected pos`` on a nearly full file system), into one ``DiskFullError`` naming the path;
:func:`os_failure_message` gives the one line for such failures met elsewhere (``pipelines.common.entry_point``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import UserError


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the path."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        where = f"writing {path}" if path else "writing a file"
        super().__init__(f"no space left on the device while {where}; free some space (or choose a folder on "
                         "another disk) and rerun the same command")


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = re.compile(r"No space left on device|os error 28|Disk quota exceeded|os error 122|StorageFull",
                             re.IGNORECASE)
# what torch.save's zip writer says when a write fails (it does not pass the OS error on)
_FAILED_WRITE_TEXT = re.compile(r"unexpected pos|iostream error|file write failed|PytorchStreamWriter", re.IGNORECASE)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _nearly_full(path: str | os.PathLike | None) -> bool:
    if path is None:
        return False
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return free < max(16 << 20, 0.001 * st.f_blocks * st.f_frsize)


def is_disk_full(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (or an error it came from) means the disk or quota is full.

    OS errors say so by their errno and safetensors by its text; ``torch.save`` reports only a failed write, which
    counts when the file system of ``path`` is (nearly) full.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(e)):
            return True
    return any(_FAILED_WRITE_TEXT.search(str(e)) for e in _chain(err)) and _nearly_full(path)


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write into ``path`` that fails for lack of space into one ``DiskFullError`` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err, path):
            raise DiskFullError(path) from None
        raise


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Delete the temporary file or folder ``path`` when the block fails or is interrupted, then re-raise."""
    try:
        yield
    except BaseException:
        if enabled:
            target = Path(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise


def os_failure_message(err: BaseException) -> str | None:
    """One line for failures of the machine rather than the code (a full disk, a name too long), else None."""
    if isinstance(err, DiskFullError):
        return str(err)
    if is_disk_full(err):
        return str(DiskFullError(getattr(err, "filename", None)))
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            name = str(e.filename or "")
            shown = name if len(name) < 120 else name[:60] + "..." + name[-40:]
            return f"a path is too long for the file system ({shown}); give a shorter path or name"
    return None
