"""One writer per folder: an exclusive ``fcntl.flock`` that the operating system releases when the process ends.

Every command that writes a folder holds ``.vqgen.lock`` inside it (``.<name>.lock`` beside a folder that is
replaced as a whole) for its whole run, and the run folder's lock when the folder lies in a run folder
(``vqgen.core.files.hold_folder`` decides). A second process is refused at once with one line naming the holder's
PID (written into the lock file). Locks are re-entrant within one process (``vqgen run`` calls the stage
functions in-process). Under ``accelerate launch`` only the process of global rank 0 takes locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from .diskspace import DiskFullError, is_disk_full
from .errors import UserError

LOCK = ".vqgen.lock"


class FolderBusyError(UserError):
    """Another process holds the folder's lock; the message names its PID."""


_HELD: dict[str, list] = {}  # real path of a lock file -> [fd, depth]


def is_main_launch_process() -> bool:
    """True except in the processes of rank > 0 of an ``accelerate launch`` / ``torchrun`` group."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
        pid = int(data["pid"])
        host = str(data.get("host", ""))[:64]
        return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "PID unknown"


@contextlib.contextmanager
def _flock(lock_path: Path, folder: Path) -> Iterator[None]:
    key = os.path.realpath(lock_path)
    if key in _HELD:  # this process holds it already (vqgen run calls the stage functions in-process)
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{lock_path} is a symbolic link; remove it (vqgen's lock file is a plain file)") from None
        if is_disk_full(err):
            raise DiskFullError(lock_path) from None
        raise UserError(f"{folder} is not writable ({err.strerror or err}); choose another folder") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{lock_path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"{folder} is in use by another vqgen process ({_holder(fd)}); wait for it to end "
                                  "or stop it, then rerun (one writer per folder)") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "command": " ".join(sys.argv)[:500]}).encode())
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, sibling: bool = False, with_parent: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (which must exist, or with ``sibling`` its parent) for the block.

    ``sibling``: the lock file is ``.<name>.lock`` beside the folder (for a folder replaced as a whole).
    ``with_parent``: also hold the parent folder's lock (a folder inside a run folder). Processes of rank > 0 of a
    launch take no lock. Raises ``FolderBusyError`` at once (naming the holder's PID) when another process holds
    one.
    """
    folder = Path(folder)
    if not is_main_launch_process():
        yield
        return
    with contextlib.ExitStack() as stack:
        lock_path = folder.parent / f".{folder.name}.lock" if sibling else folder / LOCK
        stack.enter_context(_flock(lock_path, folder))
        if with_parent:
            stack.enter_context(_flock(folder.parent / LOCK, folder.parent))
        yield
