"""Samples folders that say what they hold: written aside, renamed into place when complete, with a manifest.

``sample`` writes into ``.<name>.partial`` beside the samples folder (:func:`begin_samples`); when every file is
there it writes ``manifest.json`` last and renames the folder into place (:func:`finish_samples`), so a samples
folder under its own name is always complete, and an interrupted sampling leaves the previous one untouched.
The manifest::

    {"format": 1, "count": N, "image_size": [H, W], "image_mode": "RGB" | "L",
     "prior": {"fingerprint"}, "tokenizer": {"fingerprint"}, "sampling": {cfg_scale, temperature, top_k, top_p,
     seed, num_samples, ...}, "files": {"images/00000.png": {"size", "sha256"}, "tokens.safetensors": ..., ...}}

:func:`verify_samples` (``evaluate``) refuses, in one line naming the cause, a samples folder that is partial or
interrupted, modified after sampling (a file missing, added or changed: deleted, resized or replaced images), or
made with another tokenizer or prior than the run's. Folders written by an older vqgen (``meta.json``, no
manifest) are checked by what they record: the image names and count, one image size (the tokenizer's), the
number of token rows, the fingerprints.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Callable

from vqgen.core.errors import UserError
from vqgen.core.files import (
    LOCK,
    MARKER,
    TEMPORARY,
    check_removable,
    foreign_entries,
    parent_run,
    read_marker,
    remove_tree,
    write_marker,
)
from vqgen.core.io import file_fingerprint, load_json, save_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Written beside the samples after the manifest (by vqgen run, by vqgen itself): not part of the sample set.
NOT_LISTED = {MANIFEST, MARKER, LOCK, "vqgen_stage.json"}
IMAGE_NAME = re.compile(r"^images/(\d+)\.png$")


class SamplesError(UserError):
    """A samples folder is not what the sampler wrote (or not for this run); the message names the cause."""


def partial_path(final: str | os.PathLike) -> Path:
    """Where the samples for ``final`` are written until they are complete."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _listed(folder: Path) -> list[str]:
    """Relative paths of the files of a samples folder that the manifest covers, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not TEMPORARY.match(d))
        rel = Path(root).relative_to(folder)
        for name in files:
            if (rel == Path(".") and name in NOT_LISTED) or TEMPORARY.match(name):
                continue
            out.append((rel / name).as_posix())
    return sorted(out)


def _check_replaceable(final: Path) -> None:
    """The folder ``final`` may be replaced: absent, or a samples folder vqgen wrote holding only its files."""
    if final.exists() or final.is_symlink():
        extra = set(_manifest_files(final))
        check_removable(final, "samples", final.parent if parent_run(final) else None, extra=extra)


def _manifest_files(folder: Path) -> list[str]:
    manifest = _read_manifest(folder, strict=False)
    return [name.split("/", 1)[0] for name in (manifest or {}).get("files", {})]


def begin_samples(final: str | os.PathLike, is_main: bool, wait: Callable[[], None]) -> Path:
    """Prepare ``.<name>.partial`` beside ``final`` (main process) and return it (every process).

    Refuses before any work when ``final`` exists and may not be replaced (a user's files in it, a link, another
    kind of folder). A partial folder left by an interrupted sampling is removed first. ``wait`` synchronises
    the processes (``accelerator.wait_for_everyone``).
    """
    final = Path(final)
    tmp = partial_path(final)
    if is_main:
        _check_replaceable(final)
        if tmp.exists() or tmp.is_symlink():
            check_removable(tmp, "samples", None)
            remove_tree(tmp)
        (tmp / "images").mkdir(parents=True)
        run = parent_run(final)
        write_marker(tmp, "samples", run["run_id"] if run else None)
    wait()
    return tmp


def _image_geometry(path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image

    with Image.open(path) as image:
        return (image.height, image.width), image.mode


def build_manifest(folder: Path, meta: dict) -> dict:
    """The manifest of the complete samples in ``folder`` (``meta`` is the sampler's ``meta.json`` content)."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_fingerprint(folder / name)}
             for name in _listed(folder)}
    images = [name for name in files if IMAGE_NAME.match(name)]
    size, mode = _image_geometry(folder / images[0]) if images else ((0, 0), "")
    return {
        "format": MANIFEST_FORMAT,
        "count": len(images),
        "image_size": list(size),
        "image_mode": mode,
        "prior": {"fingerprint": (meta.get("prior") or {}).get("fingerprint")},
        "tokenizer": {"fingerprint": (meta.get("tokenizer") or {}).get("fingerprint")},
        "sampling": meta.get("sampling"),
        "files": files,
    }


def finish_samples(tmp: str | os.PathLike, final: str | os.PathLike, meta: dict) -> dict:
    """Main process: write the manifest into ``tmp`` (last), then put ``tmp`` in the place of ``final``."""
    tmp, final = Path(tmp), Path(final)
    manifest = build_manifest(tmp, meta)
    save_json(manifest, tmp / MANIFEST)
    _check_replaceable(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        remove_tree(old)
    else:
        os.replace(tmp, final)
    return manifest


def _read_manifest(folder: Path, strict: bool = True) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = load_json(path)
    except UserError:
        if strict:
            raise SamplesError(f"{path} is corrupt (not JSON); sample again") from None
        return None
    shape_ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
                and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("count"), int)
                and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
                        for v in manifest["files"].values())
                and all(isinstance(k, str) and ".." not in k.split("/") and not k.startswith("/")
                        for k in manifest["files"]))
    if not shape_ok:
        if strict:
            raise SamplesError(f"{path} is not a vqgen samples manifest; sample again")
        return None
    return manifest


def samples_complete(folder: str | os.PathLike) -> bool:
    """A quick check for ``vqgen run``: the samples folder is in place with a manifest whose files exist at their
    recorded sizes (or, written by an older vqgen, its ``meta.json``)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    manifest = _read_manifest(folder, strict=False)
    if manifest is None:
        return not (folder / MANIFEST).exists() and (folder / "meta.json").is_file()
    return all((folder / name).is_file() and (folder / name).stat().st_size == entry["size"]
               for name, entry in manifest["files"].items())


def _fingerprint_check(folder: Path, recorded: dict | None, what: str, expected: str | None, run: Path) -> None:
    got = (recorded or {}).get("fingerprint")
    if expected is not None and got != expected:
        raise SamplesError(f"{folder} was sampled with another {what} (fingerprint {str(got)[:12]}) than the run "
                           f"{run} has ({expected[:12]}); sample again with this run's {what}, or evaluate the run the "
                           "samples came from")


def verify_samples(folder: str | os.PathLike, tokenizer_fingerprint: str, prior_fingerprint: str | None = None,
                   image_size: int | None = None) -> dict | None:
    """Check that ``folder`` holds exactly what the sampler wrote, for this run; returns what it records.

    Returns None when there are no samples (no folder, or one without files, and no interrupted sampling).
    Otherwise returns
    ``{"sampling", "count", "verified"}`` (``verified``: "sha256" with a manifest, "legacy" for an older folder)
    or raises ``SamplesError`` naming the cause.
    """
    folder = Path(folder)
    run = folder.parent
    partial = partial_path(folder)
    if partial.exists():
        raise SamplesError(f"a sampling into {folder} was interrupted ({partial} is left); rerun that sample command "
                           f"to finish it, or delete {partial} to evaluate the samples already in {folder}")
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        raise SamplesError(f"{folder} is not a samples folder (a link or a file); give the folder sample wrote")
    marker = read_marker(folder)
    if marker is not None and marker["kind"] != "samples":
        raise SamplesError(f"{folder} is a vqgen {marker['kind']} folder, not samples")
    manifest = _read_manifest(folder)
    if manifest is None and not _listed(folder):  # a folder without a single file holds no samples
        return None
    if manifest is None:
        return _verify_legacy(folder, tokenizer_fingerprint, prior_fingerprint, image_size)
    listed, present = manifest["files"], set(_listed(folder))
    missing = [name for name in listed if name not in present]
    if missing:
        images = sum(1 for n in listed if IMAGE_NAME.match(n))
        raise SamplesError(f"{folder}/{missing[0]} is missing ({len(missing)} of the {len(listed)} files the manifest "
                           f"lists are gone; it lists {images} images): the samples were changed after sampling; "
                           "sample again")
    extra = sorted(present - set(listed))
    if extra:
        raise SamplesError(f"{folder}/{extra[0]} was not written by the sampler ({len(extra)} file(s) not in "
                           f"{MANIFEST}); remove it or sample again")
    for name, entry in listed.items():
        path = folder / name
        if path.stat().st_size != entry["size"] or file_fingerprint(path) != entry["sha256"]:
            raise SamplesError(f"{path} differs from what the sampler wrote (sha256 does not match {MANIFEST}): the "
                               "samples were changed after sampling; sample again")
    _fingerprint_check(folder, manifest.get("tokenizer"), "tokenizer", tokenizer_fingerprint, run)
    _fingerprint_check(folder, manifest.get("prior"), "prior", prior_fingerprint, run)
    if image_size is not None and manifest.get("image_size") not in ([image_size, image_size], [0, 0]):
        raise SamplesError(f"{folder} holds {manifest.get('image_size')} images; the run's tokenizer makes "
                           f"{image_size}x{image_size}; sample again")
    return {"sampling": manifest.get("sampling"), "count": manifest["count"], "verified": "sha256"}


def _verify_legacy(folder: Path, tokenizer_fingerprint: str, prior_fingerprint: str | None,
                   image_size: int | None) -> dict:
    """A samples folder without a manifest: only what ``meta.json`` records can be checked."""
    from vqgen.core.io import check_safetensors

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise SamplesError(f"{folder} is not a complete samples folder (no {MANIFEST}, no meta.json): its sampling "
                           "was interrupted or it was not written by vqgen; sample again")
    try:
        meta = load_json(meta_path)
    except UserError:
        raise SamplesError(f"{meta_path} is corrupt (not JSON); sample again") from None
    count = meta.get("num_samples") if isinstance(meta, dict) else None
    if not isinstance(count, int) or not isinstance(meta.get("sampling"), dict):
        raise SamplesError(f"{meta_path} is not the sampler's meta.json; sample again")
    found = foreign_entries(folder, "samples")
    if found:
        raise SamplesError(f"{folder}/{found[0]} was not written by the sampler; remove it or sample again")
    expected = {f"{i:05d}.png" for i in range(count)}
    present = {p.name for p in (folder / "images").glob("*.png")} if (folder / "images").is_dir() else set()
    if present != expected:
        gone, added = sorted(expected - present), sorted(present - expected)
        cause = (f"images/{gone[0]} is missing ({len(gone)} of {count} images are gone)" if gone
                 else f"images/{added[0]} was not written by the sampler")
        raise SamplesError(f"{folder}: {cause}; the samples were changed after sampling; sample again")
    header = check_safetensors(folder / "tokens.safetensors")
    rows = (header.get("tokens") or {}).get("shape", [None])[0]
    if rows != count:
        raise SamplesError(f"{folder}/tokens.safetensors holds {rows} samples, meta.json {count}; sample again")
    sizes = {}
    for name in sorted(present):
        size, _ = _image_geometry(folder / "images" / name)
        sizes.setdefault(size, name)
        if len(sizes) > 1 or (image_size is not None and size != (image_size, image_size)):
            want = f"{image_size}x{image_size}" if image_size is not None else "the size of the others"
            raise SamplesError(f"{folder}/images/{name} is {size[1]}x{size[0]}, not {want}: the samples were "
                               "changed after sampling; sample again")
    _fingerprint_check(folder, meta.get("tokenizer"), "tokenizer", tokenizer_fingerprint, folder.parent)
    _fingerprint_check(folder, meta.get("prior"), "prior", prior_fingerprint, folder.parent)
    return {"sampling": meta.get("sampling"), "count": count, "verified": "legacy"}
