"""Stage records: which resolved config, inputs and code produced a stage's output.

Every stage writes a record ``vqgen_stage.json`` beside its output::

    {"format": 1, "stage": "prior", "config": {...the resolved config of the stage...},
     "inputs": {"train.safetensors": "<sha256>", ...}, "provenance": {...}, "continued": [...]}

``config`` is the stage's whole resolved config; ``inputs`` are the sha256 of the files it was made from;
``provenance`` names the code, packages and machine that made it (``vqgen.core.provenance``); ``continued``
lists how a trainer's run was continued (extended, rescaled) and ``provenance_history`` the earlier code a
resumed run was begun with. A finished or interrupted stage is only reused or resumed when the new config and
inputs match its record (``record_changes``), except for the keys a stage marks as ignored (they cannot
change its result) and, for trainers, the keys it can continue over (``train.steps``, ``train.batch_size``,
``train.grad_accum``). Which keys those are is each stage's knowledge (``vqgen.pipelines.stages``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, from_dict, to_dict
from .errors import UserError
from .io import file_fingerprint, load_json, save_json
from .provenance import describe, provenance, same_code

STAGE_RECORD = "vqgen_stage.json"
RECORD_FORMAT = 1

class StaleStageError(UserError):
    """A stage folder holds results of another config or other inputs; the message says how to go on."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists and scalars are leaves."""
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ignored(key: str, ignored: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignored)


def changes(old: dict, new: dict, ignored: tuple[str, ...] = ()) -> list[str]:
    """``["model.quantizer.codebook_size: 16 -> 32", ...]``: the keys whose values differ, sorted."""
    a, b = _flatten(old), _flatten(new)
    missing = "(unset)"
    return [
        f"{key}: {json.dumps(a.get(key, missing))} -> {json.dumps(b.get(key, missing))}"
        for key in sorted(set(a) | set(b))
        if not _ignored(key, ignored) and a.get(key, missing) != b.get(key, missing)
    ]


def make_record(stage: str, config: Any, inputs: dict[str, str] | None = None) -> dict:
    """The record of ``stage`` made with ``config`` (a dataclass or a dict) from ``inputs`` (name -> sha256)."""
    return {"format": RECORD_FORMAT, "stage": stage,
            "config": config if isinstance(config, dict) else to_dict(config), "inputs": dict(inputs or {})}


def with_provenance(record: dict, previous: dict | None = None) -> dict:
    """``record`` with this process's ``provenance`` (commit, dirty flag, code fingerprint, versions, machine).

    ``previous`` is the record of the same stage that this process continues (a resumed checkpoint): the code
    that made its earlier part is kept in ``provenance_history`` when it differs from today's, so a stage
    trained by two versions of the code says so.
    """
    current = provenance()
    out = {**record, "provenance": current}
    if previous:
        history = list(previous.get("provenance_history") or [])
        old = previous.get("provenance")
        if old is not None and not same_code(old, current) and old not in history:
            history.append(old)
        if history:
            out["provenance_history"] = history
    return out


def code_change(previous: dict | None) -> str | None:
    """A warning when a stage begun by other code is continued now (None when the code is the same)."""
    if not previous:
        return None
    old = previous.get("provenance")
    if old is None or same_code(old, provenance()):
        return None
    return (f"continuing a {previous.get('stage', 'stage')} begun by {describe(old)} with {describe(provenance())}; "
            "its record lists both")


def read_record(path: str | Path) -> dict | None:
    """The record at ``path`` (None when there is none)."""
    path = Path(path)
    return load_json(path) if path.is_file() else None


def write_record(path: str | Path, record: dict) -> None:
    save_json(record, path)


def _normalise(config: dict, cls: type | None) -> dict:
    """A recorded config as today's code resolves it (fields added since then take their defaults)."""
    if cls is None:
        return config
    try:
        return to_dict(from_dict(cls, config))
    except ConfigError:
        return config  # compared as written: every difference shows


def record_changes(old: dict, new: dict, cls: type | None = None, ignored: tuple[str, ...] = ()) -> list[str]:
    """What differs between two records of one stage: config keys (minus ``ignored``), then inputs."""
    found = changes(_normalise(old.get("config") or {}, cls), _normalise(new["config"], cls), ignored)
    old_inputs, new_inputs = old.get("inputs"), new.get("inputs")
    if old_inputs is None or new_inputs is None:  # not recorded (a folder from before records): not compared
        return found
    names = set(old_inputs) | set(new_inputs)
    if old.get("partial_inputs"):  # rebuilt from an old folder: only what it recorded is compared
        names = set(old_inputs)
    for name in sorted(names):
        before, after = old_inputs.get(name, "(none)"), new_inputs.get(name, "(none)")
        if before != after:
            found.append(f"input {name}: {before[:12]} -> {after[:12]}")
    return found


def split_changes(found: list[str], continuable: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``record_changes`` output split into (changes a trainer continues over, every other change)."""
    ok = [c for c in found if _ignored(c.split(":", 1)[0], continuable)]
    return ok, [c for c in found if c not in ok]


def file_inputs(files: dict[str, Path]) -> dict[str, str]:
    """name -> sha256 of each file that exists."""
    return {name: file_fingerprint(path) for name, path in files.items() if Path(path).is_file()}


