"""Stage records: which resolved config and which inputs produced a stage's output.

Every stage writes a record ``vqgen_stage.json`` beside its output::

    {"format": 1, "stage": "prior", "config": {...the resolved config of the stage...},
     "inputs": {"train.safetensors": "<sha256>", ...}}

``config`` is the stage's whole resolved config; ``inputs`` are the sha256 of the files it was made from (the
tokenizer's weights for ``encode``, the token files for the prior, the prior's and tokenizer's weights for
``sample``, the tokenizer's weights and the sampled tokens for ``evaluate``). A finished or interrupted stage
is only reused or resumed when the new config and inputs match its record; ``changes`` lists what differs.

Keys in ``IGNORED`` do not take part in the comparison because they cannot change a stage's result: where
files go (``output_dir``, ``tokens`` (its files are fingerprinted as inputs instead), ``data.cache_dir``), how
often the run logs and checkpoints (``log_every``; ``checkpoint_every`` and ``keep_checkpoints`` because
resuming from a checkpoint is exact), where it logs (``trackers``), how often it draws reconstruction grids
(``recon_every``: outside the random streams), and how data is fetched (``num_workers``: the order comes from
the seeded sampler; ``data.cache_in_memory``: the same decoding, done once). ``encode.splits`` only says which splits to add: each encoded split records its own tokenizer
and data, and the prior fingerprints the files it trains on. Everything else counts, batch sizes of the
inference stages included (batched float arithmetic is not guaranteed to round the same way).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from vqgen.core.config import ConfigError, from_dict, read_yaml, to_dict
from vqgen.core.errors import UserError
from vqgen.core.io import file_fingerprint, load_json, save_json
from vqgen.core.provenance import describe, provenance, same_code

STAGE_RECORD = "vqgen_stage.json"
RECORD_FORMAT = 1

_CADENCE = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.trackers",
            "train.num_workers", "train.compile", "train.recon_every")  # how a run computes or shows, not what
IGNORED: dict[str, tuple[str, ...]] = {
    "tokenizer": ("output_dir", *_CADENCE, "data.cache_in_memory", "data.cache_dir"),
    "encode": ("splits",),
    "prior": ("output_dir", "tokens", *_CADENCE),
    "sample": (),
    "evaluate": (),
}


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


def record_changes(old: dict, new: dict, cls: type | None = None) -> list[str]:
    """What differs between two records of one stage: config keys (minus ``IGNORED``), then inputs."""
    stage = new["stage"]
    found = changes(_normalise(old.get("config") or {}, cls), _normalise(new["config"], cls), IGNORED[stage])
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


def legacy_record(stage: str, folder: Path) -> dict | None:
    """A record rebuilt from what a stage folder written before records existed holds (None: nothing usable).

    The trainers' ``config.yaml`` and the sampler's ``meta.json`` hold their resolved configs; of the inputs
    only what those folders name is compared (a finished prior's tokenizer, the sampler's prior and tokenizer).
    """
    try:
        if stage == "tokenizer" and (folder / "config.yaml").is_file():
            return {**make_record(stage, read_yaml(folder / "config.yaml")), "inputs": None}
        if stage == "prior" and (folder / "config.yaml").is_file():
            record = make_record(stage, read_yaml(folder / "config.yaml"))
            saved = folder / "model" / "vqgen_prior.json"  # a finished prior names its tokenizer
            if not saved.is_file():
                return {**record, "inputs": None}
            tokenizer = (load_json(saved).get("tokenizer") or {}).get("fingerprint")
            return {**record, "inputs": {"tokenizer": tokenizer} if tokenizer else None, "partial_inputs": True}
        if stage == "sample" and (folder / "meta.json").is_file():
            meta = load_json(folder / "meta.json")
            inputs = {"prior": (meta.get("prior") or {}).get("fingerprint"),
                      "tokenizer": (meta.get("tokenizer") or {}).get("fingerprint")}
            return {**make_record(stage, meta.get("sampling") or {}),
                    "inputs": {k: v for k, v in inputs.items() if v}, "partial_inputs": True}
    except (UserError, AttributeError):
        return None
    return None


def check_record(record_path: Path, new: dict, cls: type | None, what: str, ways_out: str,
                 legacy_folder: Path | None = None) -> None:
    """Raise ``StaleStageError`` when the record at ``record_path`` (or the legacy one) differs from ``new``.

    ``what`` names the folder's content ("RUN/prior holds a prior"), ``ways_out`` says how to go on.
    """
    old = read_record(record_path)
    if old is None and legacy_folder is not None:
        old = legacy_record(new["stage"], legacy_folder)
    if old is None:
        return
    found = record_changes(old, new, cls)
    if found:
        raise StaleStageError(f"{what} made with other settings ({'; '.join(found)}); {ways_out}")


def file_inputs(files: dict[str, Path]) -> dict[str, str]:
    """name -> sha256 of each file that exists."""
    return {name: file_fingerprint(path) for name, path in files.items() if Path(path).is_file()}


def remove_path(path: Path) -> None:
    """Delete a file or folder; a folder is first renamed aside, so a kill never leaves it half deleted."""
    if path.is_dir():
        trash = path.with_name(f".{path.name}.removed-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
