"""When ``vqgen run`` counts a stage as complete: every output exists and the stage's record, written last, lists it.

After a stage has produced its outputs the runner adds ``"outputs": {path: size in bytes}`` to the stage's record
(:func:`record_outputs`); a stage is complete only when its record lists every output and each is a file of the
recorded size (:func:`outputs_complete`). A trainer's folder whose record lists no outputs (written by the trainer
alone, or before outputs were listed) counts when every output exists: its ``summary.json`` is written last. The samples are complete when their folder is in
place with its manifest (``pipelines.manifest``).

A trainer folder in which nothing was produced (no checkpoint, no model, no summary: e.g. a run stopped by a
non-finite loss before its first checkpoint) holds no results; :func:`produced_nothing` tells the runner to
ignore its record, so the same command with a fixed value runs without ``--force``.
"""

from __future__ import annotations

import re
from pathlib import Path

from vqgen.core.records import read_record, write_record

def record_outputs(record_path: str | Path, base: str | Path, names: tuple[str, ...]) -> None:
    """Add the outputs ``names`` (relative to ``base``) with their sizes to the record at ``record_path``."""
    record = read_record(record_path)
    if record is None:
        return
    record["outputs"] = {name: (Path(base) / name).stat().st_size for name in names}
    write_record(record_path, record)


def outputs_complete(record_path: str | Path, base: str | Path, names: tuple[str, ...],
                     last_file: str | None = None) -> bool:
    """Whether every output in ``names`` is there as the record at ``record_path`` lists it.

    A record that lists no outputs (or no record) counts only when the stage has a file of its own that it writes
    last (``last_file``, e.g. a trainer's ``summary.json``) and every output exists.
    """
    record = read_record(record_path)
    listed = (record or {}).get("outputs")
    base = Path(base)
    if not isinstance(listed, dict):  # written before outputs were listed
        return last_file is not None and all((base / name).is_file() for name in (*names, last_file))
    return all(name in listed and (base / name).is_file() and (base / name).stat().st_size == listed[name]
               for name in names)


def produced_nothing(folder: str | Path) -> bool:
    """A trainer's folder without a checkpoint, a model or a summary (a record alone describes no results)."""
    folder = Path(folder)
    checkpoints = folder / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(re.match(r"^step_\d+$", p.name) for p in checkpoints.iterdir())
    return not (has_checkpoint or (folder / "model").exists() or (folder / "summary.json").exists())
