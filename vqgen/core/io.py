"""Small file helpers: atomic writes (nothing half-written is ever left behind), fingerprints, and reads that
name the file when it is missing or corrupt."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import CorruptFileError, MissingFileError
from .diskspace import disk_full_guard


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    Works for files and directories. If the body raises, the temporary is removed and ``path`` is left
    untouched, so readers only ever see a complete file (rename is atomic on one file system). A write that fails
    for lack of space raises ``DiskFullError`` naming ``path``.
    """
    path = Path(path)
    with disk_full_guard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = None
    try:
        with disk_full_guard(path):
            yield tmp
        if path.is_dir() and tmp.is_dir():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if old is not None and old.exists():
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # interrupted between the two renames: the old folder goes back rather than being lost
                os.replace(old, path)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; ``MissingFileError`` / ``CorruptFileError`` (naming the path) when it is missing or bad."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"expected a JSON file at {path}, but there is none")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(path, f"not valid JSON: {err}") from None


def check_safetensors(path: str | os.PathLike) -> dict:
    """Check a safetensors file's structure without reading its tensors; returns its header.

    The header must parse and the file must be exactly as long as the header says (a truncated or
    padded file fails). Raises ``MissingFileError`` or ``CorruptFileError`` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"expected a safetensors file at {path}, but there is none")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size} bytes")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise CorruptFileError(path, f"unreadable safetensors header: {err}") from None
    if size != 8 + length + end:
        raise CorruptFileError(path, f"{size} bytes on disk, the header describes {8 + length + end}")
    return header


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` after ``check_safetensors``: a bad file is one error naming its path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(path, str(err)) from None


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

