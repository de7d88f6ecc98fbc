"""Images from outside vqgen: folders of image files and ADM-style ``.npz`` batches, read and written in batches.

ADM's evaluation suite (guided-diffusion ``evaluations/``), which LlamaGen, DiT and MaskGIT-style papers use
for ImageNet gFID, exchanges ``.npz`` files:

- a *sample batch* holds ``arr_0``: uint8 images (N, H, W, 3), usually N = 50,000;
- a *reference batch* (e.g. ``VIRTUAL_imagenet256_labeled.npz``) also holds Inception pool statistics of the
  whole data set, ``mu`` (2048,) and ``sigma`` (2048, 2048) (and ``mu_s`` / ``sigma_s`` of spatial features,
  for sFID), with 10,000 images in ``arr_0`` for precision and recall.

:class:`NpzBatch` reads such a file without loading ``arr_0`` whole (50,000 images at 256 px are 9.8 GB) and
never unpickles (object arrays are refused). A 2-D float array under ``activations`` (or ``arr_0``) is read as
raw features (N, F), from which statistics are computed. :func:`write_npz_batch` writes a sample batch
from batches of images, also without holding them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from vqgen.core.errors import CorruptFileError, UserError
from vqgen.core.io import atomic_path

from .progress import progress

__all__ = ["IMAGE_EXTENSIONS", "NpzBatch", "image_files", "iter_image_files", "pack_folder", "write_npz_batch"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ACTIVATION_KEYS = ("activations", "arr_0")


class ImageSetError(UserError, ValueError):
    """A folder or ``.npz`` of images cannot be used; the message names it and what to change."""


# ------------------------------------------------------------------------------------------------ folders


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (or in ``folder/images``, a vqgen samples folder), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageSetError(f"{folder} is not a folder of images")
    for candidate in (folder, folder / "images"):
        files = sorted(p for p in candidate.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if files:
            return files
    raise ImageSetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither directly nor in "
                        f"{folder / 'images'}")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except OSError as err:
        raise CorruptFileError(path, f"not a readable image: {err}") from None


def iter_image_files(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, H, W) of the files in order; every image must have the size of the first."""
    size = None
    for start in range(0, len(files), batch_size):
        arrays = []
        for path in files[start:start + batch_size]:
            array = _read_rgb(path)
            if size is None:
                size = array.shape
            elif array.shape != size:
                raise ImageSetError(f"{path} is {array.shape[1]}x{array.shape[0]} while {files[0].name} is "
                                    f"{size[1]}x{size[0]}: every image of a set must have one size")
            arrays.append(array)
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ .npz batches


def _member_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the ``.npy`` member ``name`` (only its header is read)."""
    with zf.open(name) as f:
        return _read_header(f, path, name)


def _read_header(f, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as err:
        raise CorruptFileError(path, f"member {name} is not a .npy array: {err}") from None
    if dtype.hasobject:
        raise CorruptFileError(path, f"{name} holds Python objects; vqgen reads only plain numeric arrays")
    if fortran:
        raise CorruptFileError(path, f"{name} is stored in Fortran order; write it with np.savez (C order)")
    return tuple(shape), dtype


@dataclasses.dataclass
class NpzBatch:
    """An ADM-style ``.npz`` (see the module docstring), opened lazily: ``arrays`` maps each key to
    (shape, dtype); ``sha256`` is the file's digest (part of every cache key made from it)."""

    path: Path
    sha256: str
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]]

    @classmethod
    def open(cls, path: str | Path) -> "NpzBatch":
        """Read the headers of every array in ``path`` and hash the file."""
        path = Path(path)
        if not path.is_file():
            raise ImageSetError(f"{path} does not exist; give an ADM-style .npz (arr_0 images, and mu/sigma for a "
                                "reference batch)")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".npy")]
                arrays = {n[:-4]: _member_header(zf, n, path) for n in names}
        except zipfile.BadZipFile as err:
            raise CorruptFileError(path, f"not an .npz archive: {err}") from None
        if not arrays:
            raise CorruptFileError(path, "holds no arrays")
        return cls(path, digest.hexdigest(), arrays)

    # ------------------------------------------------------------------------ what it holds

    @property
    def num_images(self) -> int:
        """Number of images in ``arr_0`` (0 when it holds none)."""
        shape, dtype = self.arrays.get("arr_0", ((), np.dtype("f8")))
        return shape[0] if len(shape) == 4 and dtype == np.uint8 else 0

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the images in ``arr_0``, or None."""
        return tuple(self.arrays["arr_0"][0][1:3]) if self.num_images else None

    def statistics(self, feature_dim: int | None = None) -> dict[str, np.ndarray] | None:
        """``{"mu", "sigma"}`` stored in the file (None when it stores none); checked against ``feature_dim``."""
        if "mu" not in self.arrays or "sigma" not in self.arrays:
            return None
        with np.load(self.path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise CorruptFileError(self.path, f"mu {mu.shape} and sigma {sigma.shape} are not statistics of one "
                                              "feature space")
        if feature_dim is not None and mu.shape[0] != feature_dim:
            raise ImageSetError(f"{self.path} holds statistics of {mu.shape[0]}-d features, but the extractor gives "
                                f"{feature_dim}-d ones: its mu/sigma belong to another feature space")
        return {"mu": mu, "sigma": sigma}

    def activations_key(self) -> str | None:
        """The key of a 2-D float array of raw features (N, F), or None."""
        for key in ACTIVATION_KEYS:
            shape, dtype = self.arrays.get(key, ((), np.dtype("u1")))
            if len(shape) == 2 and dtype.kind == "f":
                return key
        return None

    def activations(self) -> np.ndarray | None:
        """The raw features (N, F) as float64, or None."""
        key = self.activations_key()
        if key is None:
            return None
        with np.load(self.path, allow_pickle=False) as data:
            return np.asarray(data[key], dtype=np.float64)

    def describe(self) -> dict:
        """JSON-able summary: path, sha256, arrays and their shapes."""
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "num_images": self.num_images,
                "arrays": {k: list(shape) for k, (shape, _) in self.arrays.items()}}

    # ------------------------------------------------------------------------ images in batches

    def iter_images(self, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 batches (B, 3, H, W) of ``arr_0`` (the first ``limit`` images), read from the archive in turn."""
        if not self.num_images:
            raise ImageSetError(f"{self.path} holds no uint8 images in arr_0 (N, H, W, 3); its arrays: "
                                f"{', '.join(self.arrays)}")
        shape, _ = self.arrays["arr_0"]
        if shape[3] != 3:
            raise ImageSetError(f"{self.path}: arr_0 has shape {shape}; ADM batches hold N x H x W x 3 images")
        n = shape[0] if limit is None else min(limit, shape[0])
        per_image = int(np.prod(shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_header(f, self.path, "arr_0")
            done = 0
            while done < n:
                b = min(batch_size, n - done)
                raw = f.read(b * per_image)
                if len(raw) != b * per_image:
                    raise CorruptFileError(self.path, f"arr_0 ends after {done + len(raw) // per_image} of "
                                                      f"{shape[0]} images")
                array = np.frombuffer(raw, dtype=np.uint8).reshape(b, *shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2).contiguous()
                done += b


def write_npz_batch(batches: Iterable[torch.Tensor | np.ndarray], count: int, path: str | Path) -> Path:
    """Write ``count`` images as an ADM sample batch: ``arr_0`` uint8 (N, H, W, 3), atomically.

    ``batches`` yields uint8 images, (B, 3, H, W) tensors or (B, H, W, 3) arrays, ``count`` in all; only one
    batch is held at a time. The file is an uncompressed ``.npz`` (as ``np.savez`` writes), with ZIP64 so
    that it may exceed 4 GB.
    """
    path = Path(path)
    written, shape = 0, None
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                for batch in batches:
                    array = batch.permute(0, 2, 3, 1).cpu().numpy() if torch.is_tensor(batch) else np.asarray(batch)
                    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                        raise ValueError(f"expected uint8 RGB images, got {array.dtype} {array.shape}")
                    if shape is None:
                        shape = array.shape[1:]
                        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                  "shape": (count, *shape)}
                        np.lib.format.write_array_header_1_0(f, header)
                    elif array.shape[1:] != shape:
                        raise ImageSetError(f"images of size {array.shape[1:]} after {shape}: an .npz batch holds "
                                            "images of one size")
                    take = array[: count - written]
                    f.write(np.ascontiguousarray(take).tobytes())
                    written += take.shape[0]
                    if written >= count:
                        break
        if written != count:
            raise ImageSetError(f"expected {count} images for {path}, got {written}")
    return path


def pack_folder(folder: str | Path, path: str | Path, batch_size: int = 256) -> Path:
    """Write the images of ``folder`` (see :func:`image_files`; grey ones as RGB) in name order as one ADM sample
    batch ``path`` (``arr_0`` uint8 (N, H, W, 3)), the file ADM's evaluator and the tools built on it read."""
    files = image_files(folder)
    batches = progress(iter_image_files(files, batch_size), total=-(-len(files) // batch_size),
                       desc=f"write {Path(path).name}", unit="batch")
    return write_npz_batch(batches, len(files), path)
