"""What vqgen may write, overwrite and delete, and one writer per folder.

**Markers.** Every folder vqgen creates for its results holds ``vqgen_folder.json``: ``{"vqgen_folder": 1,
"kind": ..., "run_id": ..., "created": ...}``. ``kind`` is one of :data:`KINDS`; ``run_id`` is the id of the run
folder it belongs to (a stage folder made inside a marked run folder takes the run's id, any other folder a new
one). A marker counts only when it is a regular file (not a link, not a folder) holding exactly that shape.

**Folders from older vqgen versions** (no marker) are recognised when every entry in them is a name vqgen writes
in a folder of that kind (:data:`CONTENTS`) and they hold the file that kind is known by: ``vqgen_stage.json``
naming the stage, or ``config.yaml`` with the trainer's sections (tokenizer, prior), ``meta.json`` of the right
shape (tokens, samples), ``experiment.yaml`` or a recognised stage folder (run), ``report.json`` /
``comparison.json`` (reports). Such a folder is marked when vqgen next writes into it.

**Writing** (:func:`hold_folder`, :func:`owns_folder`): a command writes only into a folder that is new, empty,
marked with its kind, or recognised as above. ``/``, the home folder and its parents, a source checkout (a
folder holding ``.git``) and vqgen's own checkout with its parents are refused whatever they hold.

**Deleting** (:func:`remove_owned`): only a folder inside a vqgen run folder, reached without a symbolic link,
marked with the expected kind and the run's id (or recognised as above), holding only names vqgen writes and no
links anywhere below. Anything else is refused with one line naming what is in the way: a user's files are
never removed.

**One writer** (``vqgen.core.locks.folder_lock``): an exclusive ``fcntl.flock`` on ``.vqgen.lock`` inside the folder (on
``.<name>.lock`` beside a folder that is replaced as a whole), held for the whole command and released by the
operating system when the process ends, however it ends. A folder inside a marked run folder also takes the
run folder's lock, so a stage command and ``vqgen run`` on the same run exclude each other. Under
``accelerate launch`` only the process of global rank 0 takes locks and writes markers. Locks are re-entrant
within one process (``vqgen run`` calls the stage functions in-process).

Full disks and over-long paths are ``vqgen.core.diskspace``'s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from . import progress
from .config import ConfigError
from .diskspace import DiskFullError, is_disk_full
from .errors import UserError
from .locks import LOCK, folder_lock, is_main_launch_process

MARKER = "vqgen_folder.json"
MARKER_FORMAT = 1
KINDS = ("run", "tokenizer", "tokens", "prior", "samples", "report", "cache")
NAME_MAX = 255  # bytes in one path component on common file systems
PATH_MAX = 4096

# Names vqgen may leave in any folder it owns: its marker and lock, and the temporaries of an interrupted write
# (``io.atomic_path``: .NAME.tmp-XXXXXXXX / .NAME.old-XXXXXXXX; a removal: .NAME.removed-XXXXXXXX; a checkpoint
# being written: .step_N.tmp; a write test; a samples folder being made: .NAME.partial; a sibling lock).
_OLD = re.compile(r"^\.(.+)\.old-[0-9a-f]{8}$")
TEMPORARY = re.compile(r"^\..+\.(tmp|old|removed)-[0-9a-f]{8}$|^\.vqgen-write-test-|^\.step_\d+\.tmp$"
                       r"|^\..+\.partial$|^\..+\.lock$")
_ALWAYS = {MARKER, LOCK}

# What each kind of folder holds at its top level: exact names, then patterns. Trainers' model/, checkpoints/
# and logs/ are checked for links only (Accelerate and TensorBoard choose the names inside).
_TRAINER = {"config.yaml", "metrics.jsonl", "summary.json", "vqgen_stage.json", "model", "checkpoints", "logs"}
CONTENTS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "run": ({"experiment.yaml", "report.json", "report.md", "report.html", "report_files", "report_stage.json",
             "tokenizer", "tokens", "prior", "samples"}, ()),
    "tokenizer": (_TRAINER | {"recon"}, ()),
    "prior": (_TRAINER, ()),
    "tokens": ({"meta.json", "vqgen_stage.json"}, (r"^\w+\.safetensors$",)),
    "samples": ({"images", "grid.png", "tokens.safetensors", "meta.json", "manifest.json", "vqgen_stage.json"},
                (r"^[\w.-]+\.npz$",)),
    "report": ({"report.json", "report.md", "report.html", "report_files", "report_stage.json", "comparison.json",
                "comparison.md", "comparison.html", "comparison_files"}, ()),
    "cache": ({"model.safetensors", "meta.json"}, ()),
}
# Sub-folders whose every entry is checked by name too (``folder kind``, sub-folder) -> patterns.
SUBFOLDER_CONTENTS = {
    ("tokenizer", "recon"): (r"^step_\d+\.png$",),
    ("samples", "images"): (r"^\d+\.png$",),
    ("run", "report_files"): (r"^[\w.-]+\.png$",),
    ("report", "report_files"): (r"^[\w.-]+\.png$",),
    ("report", "comparison_files"): (r"^[\w.-]+\.png$",),
}
# The stage folders of a run folder, by kind (what ``vqgen run --force`` may remove there).
RUN_STAGE_FOLDERS = {"tokenizer": "tokenizer", "tokens": "tokens", "prior": "prior", "samples": "samples"}


class UnsafeFolderError(UserError):
    """vqgen refuses to write into or delete a folder it did not make; the message names what is in the way."""


# ------------------------------------------------------------------------------------------------ names, paths

def check_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; ``UnsafeFolderError`` when a component or the whole is too long for a file system."""
    text = os.fspath(path)
    if "\x00" in text:
        raise UnsafeFolderError(f"{what} contains a NUL character; give a plain path")
    if len(text.encode()) > PATH_MAX:
        raise UnsafeFolderError(f"{what} is {len(text.encode())} bytes long, more than file systems allow "
                                f"({PATH_MAX}); give a shorter path")
    for part in Path(text).parts:
        if len(part.encode()) > NAME_MAX:
            raise UnsafeFolderError(f"{what} has a name of {len(part.encode())} bytes ({part[:24]}...), more than "
                                    f"file systems allow ({NAME_MAX}); give a shorter name")
    return Path(text)


def check_run_name(name: Any, where: str) -> str:
    """A run name from a sweep: a plain folder name (no separators, not ``.``/``..``, not hidden, short).

    Raises ``ConfigError`` naming ``where``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a run name (a plain folder name), got {name!r}")
    bad = [c for c in ("/", "\\", "\x00") if c in name] + ([os.sep] if os.sep in name else [])
    if bad or name in (".", "..") or name.startswith(".") or name != name.strip():
        raise ConfigError(f"{where}: 'name' must be a plain folder name (no '/', '\\', leading '.', or '..'), got "
                          f"{name!r}")
    if len(name.encode()) > NAME_MAX - 16:  # room for a seed suffix
        raise ConfigError(f"{where}: 'name' is {len(name.encode())} bytes long; keep it under {NAME_MAX - 16}")
    return name


def check_inside(child: str | os.PathLike, parent: str | os.PathLike, what: str) -> None:
    """Refuse when ``child`` (links resolved) does not lie strictly inside ``parent`` (links resolved)."""
    real_child, real_parent = os.path.realpath(child), os.path.realpath(parent)
    if os.path.commonpath([real_child, real_parent]) != real_parent or real_child == real_parent:
        raise UnsafeFolderError(f"{what} {child} resolves to {real_child}, outside {parent}; give a plain name "
                                "(and no symbolic link there)")


def protected_reason(path: str | os.PathLike) -> str | None:
    """Why vqgen never writes results into ``path`` (links resolved), or None.

    ``/``, the home folder and every folder above it, a source checkout (a folder holding ``.git``) or a folder
    inside a ``.git`` folder, and the checkout vqgen itself runs from with every folder above it.
    """
    real = Path(os.path.realpath(path))
    if real == Path(real.anchor):
        return "the root of the file system"
    home = Path(os.path.realpath(Path.home()))
    if real == home or real in home.parents:
        return "your home folder" if real == home else "a folder above your home folder"
    if (real / ".git").exists():
        return "a source checkout (it holds .git)"
    if ".git" in real.parts:
        return "inside a git repository's .git folder"
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (real == checkout or real in checkout.parents):
        return "vqgen's own source checkout" if real == checkout else "a folder above vqgen's source checkout"
    return None


# -------------------------------------------------------------------------------------------- markers, kinds

def read_marker(folder: str | os.PathLike) -> dict | None:
    """The folder's marker when it is a valid one (a regular file of the right shape), else None."""
    path = Path(folder) / MARKER
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(data, dict) or data.get("vqgen_folder") != MARKER_FORMAT or data.get("kind") not in KINDS
            or not isinstance(data.get("run_id"), str) or not re.fullmatch(r"[0-9a-f]{32}", data["run_id"])):
        return None
    return data


def write_marker(folder: str | os.PathLike, kind: str, run_id: str | None = None) -> dict:
    """Mark ``folder`` (which exists) as a vqgen folder of ``kind``; returns the marker."""
    from .io import save_json

    marker = {"vqgen_folder": MARKER_FORMAT, "kind": kind, "run_id": run_id or uuid.uuid4().hex,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(marker, Path(folder) / MARKER)
    return marker


def parent_run(folder: str | os.PathLike) -> dict | None:
    """The marker of the run folder directly above ``folder``, if that is a marked run folder."""
    marker = read_marker(Path(folder).parent)
    return marker if marker is not None and marker["kind"] == "run" else None


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as err:
        raise UnsafeFolderError(f"{folder} cannot be listed ({err.strerror or err})") from None


def _allowed(name: str, names: set[str], patterns: tuple[str, ...]) -> bool:
    return (name in names or name in _ALWAYS or bool(TEMPORARY.match(name))
            or any(re.match(p, name) for p in patterns))


def foreign_entries(folder: str | os.PathLike, kind: str, extra: set[str] = frozenset()) -> list[str]:
    """Entries of ``folder`` (relative paths) that vqgen does not write in a folder of ``kind``: unknown names at
    the top level or in the sub-folders of :data:`SUBFOLDER_CONTENTS`, and symbolic links anywhere below."""
    folder = Path(folder)
    names, patterns = CONTENTS[kind]
    names = names | set(extra)
    found = []
    for entry in _entries(folder):
        if entry.is_symlink():
            found.append(entry.name + " (a symbolic link)")
        elif not _allowed(entry.name, names, patterns):
            found.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            sub = SUBFOLDER_CONTENTS.get((kind, entry.name))
            found += [f"{entry.name}/{name}" for name in _foreign_below(Path(entry.path), sub)]
    return found


def _foreign_below(folder: Path, patterns: tuple[str, ...] | None) -> list[str]:
    """Links anywhere below ``folder``; with ``patterns``, also entries of ``folder`` matching none of them."""
    found = []
    for entry in _entries(folder):
        if entry.is_symlink():
            found.append(entry.name + " (a symbolic link)")
        elif patterns is not None and not (entry.name in _ALWAYS or TEMPORARY.match(entry.name)
                                           or (entry.is_file(follow_symlinks=False)
                                               and any(re.match(p, entry.name) for p in patterns))):
            found.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            found += [f"{entry.name}/{name}" for name in _foreign_below(Path(entry.path), None)]
    return found


def _json(path: Path) -> Any:
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 64 << 20:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _yaml(path: Path) -> Any:
    import yaml

    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
            return None
        return yaml.safe_load(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _signature(folder: Path, kind: str) -> bool:
    """Whether an unmarked ``folder`` holds the file a folder of ``kind`` written by vqgen is known by."""
    record = _json(folder / "vqgen_stage.json")
    stage = {"tokens": "encode", "samples": "sample"}.get(kind, kind)
    if isinstance(record, dict) and record.get("stage") == stage and isinstance(record.get("config"), dict):
        return True
    if kind in ("tokenizer", "prior"):  # the trainer's resolved config, or a saved model beside a config
        config = _yaml(folder / "config.yaml")
        key, saved = ("data", "config.json") if kind == "tokenizer" else ("tokens", "vqgen_prior.json")
        return isinstance(config, dict) and key in config and (
            {"model", "train"} <= set(config) or (folder / "model" / saved).is_file())
    if kind == "tokens":
        meta = _json(folder / "meta.json")
        return isinstance(meta, dict) and isinstance(meta.get("splits"), dict) and isinstance(meta.get("tokenizer"),
                                                                                                 dict)
    if kind == "samples":
        meta = _json(folder / "meta.json")
        return isinstance(meta, dict) and isinstance(meta.get("sampling"), dict)
    if kind == "run":
        experiment = _yaml(folder / "experiment.yaml")
        if isinstance(experiment, dict) and "tokenizer" in experiment:
            return True
        return any(_recognised(folder / name, stage_kind) for name, stage_kind in RUN_STAGE_FOLDERS.items())
    if kind == "report":
        return (folder / "report.json").is_file() or (folder / "comparison.json").is_file()
    if kind == "cache":
        return (folder / "model.safetensors").is_file() and (folder / "meta.json").is_file()
    return False


def _recognised(folder: Path, kind: str) -> bool:
    """An unmarked folder written by an older vqgen as a folder of ``kind`` (see the module docstring)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return _signature(folder, kind) and not foreign_entries(folder, kind)


def _is_empty(folder: Path) -> bool:
    return all(e.name in _ALWAYS or TEMPORARY.match(e.name) for e in _entries(folder))


def ownership(folder: str | os.PathLike, kind: str) -> tuple[str, dict | None]:
    """How vqgen stands to ``folder`` as a folder of ``kind``.

    Returns ``("new", None)`` (absent), ``("empty", None)``, ``("marked", marker)``, ``("legacy", None)``
    (recognised, unmarked), ``("other-kind", marker)`` or ``("foreign", None)``.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return "new", None
    if not folder.is_dir():
        return "foreign", None
    marker = read_marker(folder)
    if marker is not None:
        return ("marked" if marker["kind"] == kind else "other-kind"), marker
    if _is_empty(folder):
        return "empty", None
    return ("legacy" if _recognised(folder, kind) else "foreign"), None


def _describe_foreign(folder: Path, kind: str) -> str:
    found = foreign_entries(folder, kind) if folder.is_dir() else []
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        return f"it holds {shown}, which vqgen did not write"
    return f"it holds no {MARKER} and is not a {kind} folder vqgen wrote"


def check_writable_as(folder: str | os.PathLike, kind: str, what: str) -> str:
    """Refuse (``UnsafeFolderError``) unless vqgen may write results of ``kind`` into ``folder``; returns its
    :func:`ownership` state. Reads only."""
    folder = check_not_file(folder, what)
    reason = protected_reason(folder)
    if reason:
        raise UnsafeFolderError(f"{what} {folder} is {reason}; vqgen writes results only into a new folder or one "
                                "it made: give another folder (e.g. runs/NAME)")
    state, marker = ownership(folder, kind)
    if state == "other-kind":
        raise UnsafeFolderError(f"{what} {folder} is a vqgen {marker['kind']} folder, not a {kind} folder; give "
                                "another folder")
    if state == "foreign":
        raise UnsafeFolderError(f"{what} {folder} is an existing folder that vqgen did not make "
                                f"({_describe_foreign(folder, kind)}); give a new or empty folder")
    return state


# ----------------------------------------------------------------------------------------------- writability

def check_not_file(path: str | os.PathLike, what: str = "--output-dir") -> Path:
    """Refuse (``UserError``) when ``path`` is a file or lies under one; reads only."""
    path = check_path(path, what)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"lies under {parent}, which is a file"
                raise UserError(f"{what} {path} {where}; give a folder")
            break
    return path


def ensure_folder(path: str | os.PathLike, what: str = "--output-dir") -> Path:
    """Make sure ``path`` is (or can become) a writable folder before any work; creates it.

    Raises ``UserError`` naming the path when it is a file, lies under a file, is too long, or cannot be written.
    """
    path = check_not_file(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vqgen-write-test-"):
            pass
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path) from None
        raise UserError(f"{what} {path} is not writable ({err.strerror or err}); choose another folder") from None
    return path


def _clean_temporaries(folder: Path) -> None:
    """Remove what interrupted writes left in ``folder`` and below (the caller holds the folder's lock).

    Locks stay, and so does an interrupted sampling (``.NAME.partial``): ``evaluate`` names it, the next
    ``sample`` into that folder removes it. A folder moved aside for its replacement (``.NAME.old-XXXXXXXX``)
    whose ``NAME`` is gone (a process killed between the two renames) is renamed back, not removed.
    """
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if TEMPORARY.match(name) and not name.endswith((".lock", ".partial")):
                path = Path(root) / name
                kept = _OLD.match(name)
                if kept and not (Path(root) / kept.group(1)).exists():
                    os.replace(path, Path(root) / kept.group(1))
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                if name in dirs:  # renamed back or removed: nothing left under this name to walk into
                    dirs.remove(name)


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, kind: str, what: str = "--output-dir",
                replaced: bool = False) -> Iterator[Path]:
    """Everything a command does before writing results of ``kind`` into ``folder``, for the whole block.

    Checks that vqgen may write there (:func:`check_writable_as`), creates it, takes its lock
    (:func:`folder_lock`), marks it (a new, empty or recognised folder) and removes the temporaries of
    interrupted writes. ``replaced``: the folder is written elsewhere and renamed into place when complete (the
    samples): only its parent is created, the lock is a sibling file, nothing is marked here.
    """
    folder = check_not_file(folder, what)
    check_writable_as(folder, kind, what)
    if replaced:
        ensure_folder(folder.parent, what)
    else:
        ensure_folder(folder, what)
    with folder_lock(folder, sibling=replaced, with_parent=parent_run(folder) is not None):
        if not replaced and is_main_launch_process():
            state = check_writable_as(folder, kind, what)  # again, under the lock
            if state != "marked":
                run = parent_run(folder)
                run_id = write_marker(folder, kind, run["run_id"] if run and kind != "run" else None)["run_id"]
                if kind == "run":  # a run folder marked now adopts the stage folders vqgen wrote in it before
                    for name, stage_kind in RUN_STAGE_FOLDERS.items():
                        stage = folder / name
                        if not stage.is_symlink() and stage.is_dir() and (
                                _recognised(stage, stage_kind) or (read_marker(stage) or {}).get("kind") == stage_kind):
                            write_marker(stage, stage_kind, run_id)
            _clean_temporaries(folder)
        yield folder


def owns_folder(folder_of: Callable[..., Any], kind: str | Callable[..., str],
                what: str | Callable[..., str] = "--output-dir", replaced: bool = False) -> Callable:
    """Decorate a function that writes results into one folder: it runs inside :func:`hold_folder`.

    ``folder_of(*args, **kwargs)`` gives the folder from the call's arguments; ``kind`` and ``what`` (how messages
    name the folder) are values or functions of the arguments. On a normal return the progress report
    (:mod:`vqgen.core.progress`) is cleared.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = folder_of(*args, **kwargs)
            folder_kind = kind(*args, **kwargs) if callable(kind) else kind
            name = what(*args, **kwargs) if callable(what) else what
            with hold_folder(folder, folder_kind, name, replaced=replaced):
                result = fn(*args, **kwargs)
            progress.clear()
            return result

        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------------- deletion

def check_removable(path: str | os.PathLike, kind: str, run: str | os.PathLike | None,
                    extra: set[str] = frozenset()) -> None:
    """Refuse (``UnsafeFolderError``) unless vqgen may delete the folder ``path`` of ``kind``.

    ``run``: the run folder it must lie in (None for a folder replaced on its own, e.g. samples written with
    ``--output-dir``); its marker's run id must then match. ``extra``: more names that folder may hold.
    """
    path = Path(path)
    if path.is_symlink():
        raise UnsafeFolderError(f"{path} is a symbolic link; vqgen never deletes through links: remove or move it "
                                "yourself")
    if not path.is_dir():
        raise UnsafeFolderError(f"{path} is not a folder vqgen made; move it away yourself")
    if run is not None:
        check_inside(path, run, "the folder")
        reason = protected_reason(run)
        if reason:
            raise UnsafeFolderError(f"{run} is {reason}; vqgen deletes nothing there")
    marker = read_marker(path)
    if marker is None and not _recognised(path, kind):
        raise UnsafeFolderError(f"{path} was not made by vqgen as a {kind} folder ({_describe_foreign(path, kind)}); "
                                "move it away yourself, or give another output folder")
    if marker is not None:
        if marker["kind"] != kind:
            raise UnsafeFolderError(f"{path} is a vqgen {marker['kind']} folder, not a {kind} folder; vqgen leaves "
                                    "it alone: move it away yourself")
        owner = parent_run(path) if run is not None else None
        if owner is not None and owner["run_id"] != marker["run_id"]:
            raise UnsafeFolderError(f"{path} belongs to another vqgen run (run id {marker['run_id'][:8]}, this run "
                                    f"is {owner['run_id'][:8]}); vqgen deletes only what this run made: move it "
                                    "away yourself")
    found = foreign_entries(path, kind, extra)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UnsafeFolderError(f"{path} holds {shown}, which vqgen did not write; vqgen never deletes a user's "
                                "files: move them out and rerun")


def remove_tree(path: Path) -> None:
    """Delete a folder: renamed aside first, so a kill never leaves it half deleted under its name."""
    trash = path.with_name(f".{path.name}.removed-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_removable_entry(run: Path, name: str) -> None:
    """Refuse unless the entry ``name`` of the run folder ``run`` may be deleted by ``--force``."""
    path = run / name
    stage = name[1:-len(".partial")] if name.startswith(".") and name.endswith(".partial") else name
    kind = RUN_STAGE_FOLDERS.get(stage)
    if kind is not None:  # a stage folder, or the samples of an interrupted sampling
        check_removable(path, kind, run)
    elif path.is_symlink() or not (path.is_file() or path.is_dir()):
        raise UnsafeFolderError(f"{path} is a symbolic link or a special file; vqgen leaves it alone: remove it "
                                "yourself")
    elif path.is_dir():  # report_files: figures only
        found = _foreign_below(path, SUBFOLDER_CONTENTS[("run", name)]) if ("run", name) in SUBFOLDER_CONTENTS \
            else [name]
        if found:
            raise UnsafeFolderError(f"{path} holds {', '.join(found[:3])}, which vqgen did not write; move them out "
                                    "and rerun")
    elif name not in CONTENTS["run"][0]:
        raise UnsafeFolderError(f"{path} is not a file vqgen writes; remove it yourself")


def remove_owned(run: Path, names: list[str]) -> list[str]:
    """Delete the entries ``names`` of the run folder ``run`` after checking every one (nothing is deleted when
    one is refused). Returns the names removed."""
    present = [n for n in names if (run / n).exists() or (run / n).is_symlink()]
    for name in present:
        check_removable_entry(run, name)
    for name in present:
        path = run / name
        if path.is_dir():
            remove_tree(path)
        else:
            path.unlink()
    return present
