"""Where a running command is, so an interrupt can say it in one line.

A trainer calls :func:`report_step` after each optimizer step; ``pipelines.common.entry_point`` turns a
``KeyboardInterrupt`` (Ctrl-C, SIGINT) into ``interrupted at step N (tokenizer); rerun the same command to
resume`` using :func:`interrupt_message`. The state is per process and holds only the latest report.
"""

from __future__ import annotations

_CURRENT: dict = {}


def report_step(step: int, what: str = "") -> None:
    """Record that ``what`` (e.g. ``"tokenizer"``) has finished optimizer step ``step``."""
    _CURRENT.clear()
    _CURRENT.update(step=int(step), what=str(what))


def clear() -> None:
    """Forget the last report (a command that finished its work calls this)."""
    _CURRENT.clear()


def current() -> dict | None:
    """``{"step": N, "what": name}`` of the last report, or None."""
    return dict(_CURRENT) if _CURRENT else None


def interrupt_message() -> str:
    """The one line an interrupted command prints."""
    now = current()
    if now is None:
        return "interrupted; rerun the same command to continue (nothing half-written was kept)"
    where = f" ({now['what']})" if now["what"] else ""
    return f"interrupted at step {now['step']}{where}; rerun the same command to resume"
