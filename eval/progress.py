"""Progress bars for long evaluation phases (tqdm on stderr; ``VQGEN_NO_PROGRESS=1`` turns them off)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = False,
             disable: bool = False):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), off when ``disable`` or when
    ``VQGEN_NO_PROGRESS`` is set."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=disable or bool(os.environ.get("VQGEN_NO_PROGRESS")))
