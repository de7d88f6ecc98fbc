"""The one base class of failures a user can fix (bad config, missing or corrupt file, unusable data).

Every library raises a subclass of ``UserError`` for such failures, with a message that says what to change.
The entry points in ``pipelines`` print that message as one line on stderr and exit with code 2 (see
``pipelines.common.entry_point``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A failure the user can fix; the message names the cause and what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed at (or an earlier stage should have written) is not there."""


class CorruptFileError(UserError, OSError):
    """A file exists but cannot be read (truncated, not what its name says); the message names its path."""

    def __init__(self, path: str | Path, detail: str, hint: str = ""):
        self.path = Path(path)
        message = f"{path} is corrupt or truncated ({detail})"
        super().__init__(message + (f"; {hint}" if hint else ""))


def one_line(message: object) -> str:
    """A message on one line (library messages sometimes span several)."""
    return " ".join(str(message).split())


def warn(accelerator, message: str) -> None:
    """One ``warning: ...`` line on stderr, from the main process (every process when ``accelerator`` is None)."""
    import sys

    if accelerator is None or accelerator.is_main_process:
        print(f"warning: {one_line(message)}", file=sys.stderr)
