"""Data for every stage: an embedded procedural image set and anything ``datasets.load_dataset`` reads.

``build_dataset(cfg, split)`` returns a torch ``Dataset`` whose items are dicts::

    {"image": float (C, H, W) in [-1, 1], "label": int64 scalar, "factors": int64 (F,)}

Two sources share that contract:

- ``synthetic`` (:class:`SyntheticShapes`): shapes x colours x grid positions x scales on a dark noisy
  background, generated in-process from a seed. The factors are known exactly, so a generator's mode
  coverage can be counted. ``label = shape * n_colours + colour`` (the "mode").
- ``hf`` (:class:`HFImageDataset`): a hub name, local parquet files or an image folder through
  ``datasets``. Images are decoded lazily per item (or once into memory with ``cache_in_memory``), then
  go through the one preprocessing path :func:`preprocess_pil` (mode L/RGB, a square crop scaled to
  ``image_size``, scale to [-1, 1]). ``factors`` is ``[label]``, or empty with ``label = -1`` when unlabeled.

Training augmentations (``data.random_crop``, ``data.hflip``; off by default) are not part of any split:
:func:`augmented` wraps the split a trainer learns from, and draws each image's crop and flip from
(seed, epoch, index) alone, so a resumed run sees the same images as an uninterrupted one.

Each dataset carries ``num_classes``, ``factor_names``, ``factor_sizes``, ``class_names`` and a
``fingerprint`` (stable hash of what defines its images, for caching FID statistics and classifiers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vqgen.core.config import ConfigError
from vqgen.core.hub import hub_reachable

SPLITS = ("train", "validation", "test")
SOURCES = ("synthetic", "hf")
RESIZE_POLICIES = ("resize", "center_crop", "stretch")

# Bump when the synthetic generator changes, so cached statistics keyed by the fingerprint go stale.
SYNTHETIC_VERSION = 1

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
# RGB palette chosen so that the luminances (grey mode) stay distinct too: 52, 100, 126, 148, 178, 227.
COLOUR_NAMES = ("blue", "red", "magenta", "green", "orange", "yellow")
PALETTE = torch.tensor(
    [[20, 40, 200], [240, 40, 40], [220, 60, 220], [60, 210, 60], [255, 170, 20], [255, 245, 80]],
    dtype=torch.uint8,
)
GRID = 3  # positions: a GRID x GRID grid of cells, index = row * GRID + col
SCALES = (0.28, 0.44)  # half-extent of a shape as a fraction of the cell side
BACKGROUND = (8, 32)  # background grey level drawn uniformly in [lo, hi) per pixel (slightly noisy)
SYNTHETIC_FACTORS = ("shape", "colour", "position", "scale")
# Rec. 601 luma weights: grey images are the luminance of the RGB ones.
LUMA = torch.tensor([0.299, 0.587, 0.114])

# Source split names (as hub datasets spell them) accepted for each of our splits.
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


class DataError(ConfigError):
    """The data configuration or the data on disk is unusable; the message says what to change."""


@dataclasses.dataclass
class DataConfig:
    """Where images come from and how they are preprocessed (section ``data`` of every config).

    ``source="synthetic"`` uses the embedded shapes set (sizes ``num_train`` / ``num_validation`` /
    ``num_test``). ``source="hf"`` reads with ``datasets.load_dataset(path, data_files=..., data_dir=...)``:
    ``path`` is a hub name, a builder (``"parquet"``, ``"imagefolder"``) or a local dataset folder; when it is
    left out it is inferred from ``data_files`` (by extension) or ``data_dir`` (image folder).
    """

    source: str = "synthetic"
    path: str | None = None
    data_files: dict[str, str] | None = None  # split -> file or glob
    data_dir: str | None = None
    image_column: str | None = None  # None: the first Image feature
    label_column: str | None = None  # None: a ClassLabel feature or a column "label"/"labels"; else unlabeled
    image_size: int = 32
    channels: int = 3
    # "resize": short side scaled to image_size, the central square kept (aspect ratio kept); "center_crop": the
    # central square cut at whole source pixels, then scaled; "stretch": the whole image scaled to a square
    resize: str = "resize"
    # training split of the tokenizer only (see ``augmented``): a random square crop instead of the central one,
    # its side a uniform fraction in [random_crop_min, 1] of the short side, at a uniform random position
    random_crop: bool = False
    random_crop_min: float = 0.8
    hflip: bool = False  # training split of the tokenizer only: mirror left-right with probability 1/2
    validation_fraction: float = 0.05  # carved from train when the source has no validation split
    max_samples: int | None = None  # per-split cap (a seeded random subset), for quick runs
    seed: int = 0
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    cache_in_memory: bool = False  # hf: decode every image once into a uint8 tensor
    cache_dir: str | None = None  # hf: where ``datasets`` keeps its Arrow cache (None: its default)

    def validate(self) -> None:
        """Raise ``DataError`` naming the field to change when the configuration cannot work."""
        if self.source not in SOURCES:
            raise DataError(f"data.source={self.source!r} is unknown; use one of {', '.join(SOURCES)}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise DataError(f"data.image_size={self.image_size!r} must be one integer >= 8 (square images)")
        if self.channels not in (1, 3):
            raise DataError(f"data.channels={self.channels!r} must be 1 (grey) or 3 (RGB)")
        if self.resize not in RESIZE_POLICIES:
            raise DataError(f"data.resize={self.resize!r} is unknown; use one of {', '.join(RESIZE_POLICIES)}")
        if not 0.0 < self.random_crop_min <= 1.0:
            raise DataError(f"data.random_crop_min={self.random_crop_min!r} must be in (0, 1]")
        if self.random_crop and self.resize == "stretch":
            raise DataError("data.random_crop cuts square crops, which data.resize=stretch never does (validation and "
                            "test would look different from training); use data.resize=resize or turn random_crop off")
        if self.random_crop and self.cache_in_memory and self.source == "hf":
            raise DataError("data.random_crop crops the source images, which data.cache_in_memory does not keep; set "
                            "data.cache_in_memory=false (data.hflip works with the cache)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"data.validation_fraction={self.validation_fraction!r} must be in [0, 1)")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"data.max_samples={self.max_samples!r} must be >= 1, or null for no cap")
        if self.num_train < 1 or self.num_validation < 0 or self.num_test < 0:
            raise DataError("data.num_train must be >= 1 and data.num_validation, data.num_test >= 0")
        if self.source == "synthetic":
            given = [k for k in ("path", "data_files", "data_dir") if getattr(self, k) is not None]
            if given:
                raise DataError(
                    f"data.{given[0]} is set but data.source='synthetic' ignores it; set data.source=hf "
                    f"to read it, or remove data.{given[0]}"
                )
        else:
            if self.path is None and not self.data_files and self.data_dir is None:
                raise DataError(
                    "data.source='hf' needs data.path (hub name or builder such as 'parquet'), "
                    "data.data_files (split -> file) or data.data_dir (image folder)"
                )
            unknown = sorted(set(self.data_files or {}) - set(SPLITS))
            if unknown:
                raise DataError(
                    f"data.data_files has split {unknown[0]!r}; its keys must be among {', '.join(SPLITS)}"
                )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _hash(obj: object) -> str:
    """Stable short sha256 of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _seed_for(seed: int, split: str) -> int:
    """A 63-bit generator seed per (seed, split), so splits differ but each is reproducible."""
    return int(hashlib.sha256(f"vqgen-data:{seed}:{split}".encode()).hexdigest()[:15], 16)


# --------------------------------------------------------------------------------------- synthetic


def render_shapes(factors: torch.Tensor, image_size: int, channels: int, generator: torch.Generator,
                  chunk: int = 1024) -> torch.Tensor:
    """Draw one image per row of ``factors`` (N, 4) = (shape, colour, position, scale) -> uint8 (N, C, S, S).

    Masks come from a coordinate grid, vectorised over ``chunk`` images at a time. Each shape gets a
    random sub-cell offset (continuous, not a factor) that keeps it inside its grid cell, so pixels of
    the shape always lie in the cell named by ``position``.
    """
    n = factors.shape[0]
    s = image_size
    cell = s / GRID
    scales = torch.tensor(SCALES)
    # Pixel centres, (1, S, 1) and (1, 1, S).
    ys = (torch.arange(s, dtype=torch.float32) + 0.5).view(1, s, 1)
    xs = (torch.arange(s, dtype=torch.float32) + 0.5).view(1, 1, s)
    out = torch.empty(n, channels, s, s, dtype=torch.uint8)
    for start in range(0, n, chunk):
        f = factors[start:start + chunk]
        b = f.shape[0]
        shape, colour, pos, scale = f.unbind(1)
        r = (scales[scale] * cell).view(b, 1, 1)  # half-extent in pixels, (b, 1, 1)
        slack = cell / 2 - r  # how far the centre may move and keep the shape in its cell
        jitter = (torch.rand(b, 2, generator=generator) * 2 - 1).view(b, 2, 1, 1) * slack.unsqueeze(1) * 0.8
        cy = ((pos // GRID).float() + 0.5).view(b, 1, 1) * cell + jitter[:, 0]
        cx = ((pos % GRID).float() + 0.5).view(b, 1, 1) * cell + jitter[:, 1]
        dy, dx = ys - cy, xs - cx  # (b, S, S) each
        ady, adx = dy.abs(), dx.abs()
        masks = torch.stack(
            [
                dx * dx + dy * dy <= r * r,  # circle
                torch.maximum(adx, ady) <= 0.85 * r,  # square (slightly smaller: similar area)
                (dy <= r) & (dy >= -r) & (adx <= (dy + r) / 2),  # triangle, apex up, base 2r wide
                ((adx <= r / 3) & (ady <= r)) | ((ady <= r / 3) & (adx <= r)),  # cross
            ],
            dim=1,
        )  # (b, 4, S, S)
        mask = masks[torch.arange(b), shape]  # (b, S, S)
        # Tiny images: a small shape may cover no pixel centre; always draw the pixel under the centre.
        mask |= (ys.floor() == cy.floor()) & (xs.floor() == cx.floor())
        bg = torch.randint(BACKGROUND[0], BACKGROUND[1], (b, 1, s, s), generator=generator, dtype=torch.uint8)
        img = bg.expand(b, 3, s, s).clone()
        fg = PALETTE[colour].view(b, 3, 1, 1).expand(b, 3, s, s)
        rgb = torch.where(mask.unsqueeze(1), fg, img)  # (b, 3, S, S) uint8
        if channels == 1:
            rgb = (rgb.float() * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        out[start:start + b] = rgb
    return out


class SyntheticShapes(Dataset):
    """The embedded procedural image set: shape x colour x position x scale, generated once from a seed.

    Factors: shape (circle, square, triangle, cross), colour (6), position (3x3 grid cell, row-major),
    scale (2). ``label = shape * 6 + colour``. The same ``(seed, split)`` gives the same images; other
    splits give other images from the same distribution. Images are held as uint8 ``images`` (N, C, S, S);
    ``factors_table`` (N, 4) and ``labels`` (N,) hold the ground truth.
    """

    factor_names = list(SYNTHETIC_FACTORS)
    factor_sizes = [len(SHAPE_NAMES), len(COLOUR_NAMES), GRID * GRID, len(SCALES)]
    num_classes = len(SHAPE_NAMES) * len(COLOUR_NAMES)
    class_names = [f"{c} {s}" for s in SHAPE_NAMES for c in COLOUR_NAMES]

    def __init__(self, num_images: int, image_size: int = 32, channels: int = 3, seed: int = 0,
                 split: str = "train"):
        _check_split(split)
        if image_size < 8 or channels not in (1, 3):
            raise DataError("SyntheticShapes needs image_size >= 8 and channels 1 or 3")
        g = torch.Generator().manual_seed(_seed_for(seed, split))
        self.factors_table = torch.stack(
            [torch.randint(k, (num_images,), generator=g) for k in self.factor_sizes], dim=1
        )  # (N, 4) int64
        self.labels = self.factors_table[:, 0] * len(COLOUR_NAMES) + self.factors_table[:, 1]
        self.images = render_shapes(self.factors_table, image_size, channels, g)
        self.fingerprint = _hash(
            {"source": "synthetic", "version": SYNTHETIC_VERSION, "n": num_images, "size": image_size,
             "channels": channels, "seed": seed, "split": split}
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item(i)

    def item(self, i: int, view: "View | None" = None) -> dict[str, torch.Tensor]:
        """Item ``i``; ``view`` (training augmentation) crops and mirrors its image (the factors describe the
        rendered image)."""
        image = self.images[i]
        if view is not None:
            if view.crop is not None:  # the rendered image is the source
                image = preprocess_pil(to_pil(image), image.shape[-1], image.shape[0], crop=view.crop)
            if view.flip:
                image = image.flip(-1)
        return {"image": to_float(image), "label": self.labels[i], "factors": self.factors_table[i]}


# ---------------------------------------------------------------------------------------------- hf


# A square in an image: (side as a fraction of the short side in (0, 1], x in [0, 1], y in [0, 1]); see crop_box
Crop = tuple[float, float, float]
CENTRE: Crop = (1.0, 0.5, 0.5)  # the central square


def crop_box(width: int, height: int, crop: Crop) -> tuple[float, float, float, float]:
    """The square ``crop`` of a ``width`` x ``height`` image as a PIL box (left, top, right, bottom), in source
    pixels, not rounded: side ``crop[0] * min(width, height)``; ``x``, ``y`` place it from the left / top edge
    (0) to the right / bottom edge (1)."""
    scale, x, y = crop
    side = scale * min(width, height)
    left, top = x * (width - side), y * (height - side)
    return left, top, left + side, top + side


def preprocess_pil(img: Image.Image, image_size: int, channels: int, resize: str = "resize",
                   crop: Crop | None = None) -> torch.Tensor:
    """The one preprocessing path for real images: PIL -> uint8 (C, S, S).

    ``resize`` (the policy, ``DataConfig.resize``): ``resize`` scales the short side to S and keeps the central
    S x S, i.e. the central square of the source scaled to S (bicubic, over a box that is not rounded to whole
    pixels, so it is exactly centred; PIL filters over the source footprint, so downscaling is antialiased);
    a square image is scaled as a whole. ``center_crop`` cuts the central square at whole source pixels, then
    scales it. ``stretch`` scales the whole image to S x S (the aspect ratio is not kept). ``crop`` (training
    augmentation) replaces the central square by another square of the image (see :func:`crop_box`).
    """
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        _log_conversion(img.mode, target, channels)
    img = img.convert(target)  # also drops alpha and expands palettes
    w, h = img.size
    box = None
    if crop is not None:
        box = crop_box(w, h, crop)
    elif resize == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif resize == "resize" and w != h:
        box = crop_box(w, h, CENTRE)
    if box is not None:
        img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
    elif img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)  # (S, S) or (S, S, 3)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) with C = 1 or 3 -> a PIL image of mode L or RGB."""
    arr = image.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


_LOGGED_CONVERSIONS: set[tuple[str, str]] = set()
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def _log_conversion(mode: str, target: str, channels: int) -> None:
    """Say once per process and (source mode, target mode) that images are converted, and what is lost."""
    if (mode, target) in _LOGGED_CONVERSIONS:
        return
    _LOGGED_CONVERSIONS.add((mode, target))
    what = []
    if mode.startswith("P"):
        what.append("the palette is expanded")
    if "A" in mode or "a" in mode:
        what.append("the alpha channel is dropped")
    if target == "L" and mode not in _GREY_MODES:
        what.append("colour becomes grey")
    if target == "RGB" and mode in _GREY_MODES:
        what.append("the grey channel is copied to R, G and B")
    if mode.startswith(("I", "F")):
        what.append("values are clipped to 8 bits")
    logging.getLogger("vqgen.data").warning(
        f"warning: data images of mode {mode} are converted to {target} (data.channels={channels})"
        + (f": {', '.join(what)}" if what else "") + " (said once)"
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [-1, 1] (any shape)."""
    return images.float() / 127.5 - 1.0


def _resolve_builder(cfg: DataConfig) -> str:
    """``cfg.path``, or the packaged builder implied by ``data_files`` / ``data_dir``."""
    if cfg.path is not None:
        return cfg.path
    if cfg.data_files:
        exts = {Path(p).suffix.lower().lstrip(".") for p in cfg.data_files.values()}
        builders = {"parquet": "parquet", "csv": "csv", "json": "json", "jsonl": "json", "arrow": "arrow"}
        found = {builders.get(e) for e in exts}
        if len(found) != 1 or None in found:
            raise DataError(
                f"cannot tell the format of data.data_files (extensions {sorted(exts)}); "
                "set data.path to a builder such as 'parquet' or 'imagefolder'"
            )
        return found.pop()
    return "imagefolder"


def _is_remote(p: str) -> bool:
    return "://" in p


def _local_files(cfg: DataConfig) -> dict[str, list[str]]:
    """Check that every local data file / glob exists; returns split -> sorted matching files."""
    out: dict[str, list[str]] = {}
    for split, pattern in (cfg.data_files or {}).items():
        if _is_remote(pattern):
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(
                f"data.data_files.{split}={pattern!r} matches no file (working directory {os.getcwd()}); "
                "fix the path"
            )
        out[split] = matches
    if cfg.data_dir is not None and not _is_remote(cfg.data_dir) and cfg.path in (None, "imagefolder"):
        if not Path(cfg.data_dir).expanduser().is_dir():
            raise DataError(f"data.data_dir={cfg.data_dir!r} is not a folder; fix the path")
    return out


def _is_hub_name(builder: str) -> bool:
    """Whether ``builder`` names a hub data set (not a packaged builder such as 'parquet', not a local path)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return builder not in _PACKAGED_DATASETS_MODULES and not Path(builder).expanduser().exists()




@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """While ``enabled``: datasets and huggingface_hub in offline mode (cached data sets only, no retries)."""
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' own error log lines while loading (the DataError we raise says the same, once)."""
    import logging

    lib = logging.getLogger("datasets")
    level = lib.level
    lib.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lib.setLevel(level)


def _load(cfg: DataConfig):
    """``datasets.load_dataset`` with our errors; returns a ``DatasetDict``."""
    import datasets  # imported here: synthetic-only users never pay for it

    builder = _resolve_builder(cfg)
    offline = _is_hub_name(builder) and not hub_reachable(offline=True)
    try:
        with _hub_offline(offline), _quiet_datasets():
            dsd = datasets.load_dataset(
                builder,
                data_files=dict(cfg.data_files) if cfg.data_files else None,
                data_dir=cfg.data_dir,
                cache_dir=cfg.cache_dir,
            )
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        if offline:
            raise DataError(
                f"data.path={builder!r} is a hub data set, the hub cannot be reached from this machine and it is not "
                "in the local datasets cache; download it where there is a network (or copy its files here and "
                "use data.data_files / data.data_dir)"
            ) from None
        raise DataError(
            f"datasets could not load {builder!r} (data_files={cfg.data_files}, data_dir={cfg.data_dir}): "
            f"{' '.join(str(err).split()).rstrip('.')}. Check data.path (hub name, 'parquet', 'imagefolder') and that files "
            "exist; without a network only local files work"
        ) from None
    except Exception as err:  # datasets wraps some reader failures in its own classes
        if type(err).__module__.split(".")[0] != "datasets":
            raise
        raise DataError(f"datasets could not read {builder!r} (data_files={cfg.data_files}, "
                        f"data_dir={cfg.data_dir}): {' '.join(str(err).split())}") from None
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"{builder!r} did not load as named splits; give data.data_files as split -> file")
    return dsd


def _image_column(ds, cfg: DataConfig) -> str:
    import datasets

    cols = list(ds.features)
    if cfg.image_column is not None:
        if cfg.image_column not in cols:
            raise DataError(f"data.image_column={cfg.image_column!r} is not a column; columns: {cols}")
        if not isinstance(ds.features[cfg.image_column], datasets.Image):
            raise DataError(f"data.image_column={cfg.image_column!r} does not hold images; columns: {cols}")
        return cfg.image_column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise DataError(f"no image column found (columns: {cols}); set data.image_column to the image column")


def _label_column(ds, cfg: DataConfig) -> str | None:
    import datasets

    cols = list(ds.features)
    if cfg.label_column is not None:
        if cfg.label_column not in cols:
            raise DataError(f"data.label_column={cfg.label_column!r} is not a column; columns: {cols}")
        return cfg.label_column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in ("label", "labels"):
        feature = ds.features.get(name)
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            return name
    return None


def _source_split(dsd, split: str) -> str | None:
    for name in _SPLIT_ALIASES[split]:
        if name in dsd:
            return name
    return None


def _subset(n: int, k: int, seed: int, salt: str) -> torch.Tensor:
    """A seeded random choice of ``k`` of ``n`` indices, kept in source order (int64 (k,))."""
    g = torch.Generator().manual_seed(_seed_for(seed, salt))
    return torch.randperm(n, generator=g)[:k].sort().values


def _split_indices(dsd, cfg: DataConfig, split: str) -> tuple[str, torch.Tensor | None]:
    """Which source split to read and which of its rows (None: all).

    Without a source validation split, validation is a seeded random ``validation_fraction`` of train,
    and train is the rest, so the two never overlap.
    """
    available = list(dsd)
    name = _source_split(dsd, split)
    if split == "test" or _source_split(dsd, "validation") is not None:
        if name is None:
            raise DataError(f"the data has no {split!r} split (splits: {available}); {split_hint(cfg, split)}")
        return name, None
    # No source validation split: carve it from train.
    train = _source_split(dsd, "train")
    if train is None:
        raise DataError(f"the data has no 'train' split (splits: {available}); {split_hint(cfg, 'train')}")
    n = len(dsd[train])
    n_val = int(round(n * cfg.validation_fraction))
    if n_val == 0 or n_val == n:
        if split == "train":
            return train, None
        raise DataError(
            f"the data has no validation split (splits: {available}) and validation_fraction="
            f"{cfg.validation_fraction} of {n} train rows carves none; raise data.validation_fraction, "
            f"or {split_hint(cfg, 'validation')}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(cfg.seed, "carve")))
    chosen = perm[:n_val] if split == "validation" else perm[n_val:]
    return train, chosen.sort().values


def split_hint(cfg: DataConfig, split: str) -> str:
    """How to give the data ``cfg`` describes a ``split`` it lacks, in the terms of its kind of source."""
    if cfg.source == "synthetic":
        return f"set data.num_{split} > 0"
    if cfg.data_files:
        return f"add data.data_files.{split}=<file or glob of its rows>"
    builder = _resolve_builder(cfg)
    if builder == "imagefolder" and cfg.data_dir is not None:
        folder = Path(cfg.data_dir) / split
        return (f"add a folder {folder}/ laid out like the training images (one sub-folder per class, "
                "as in data.data_dir/train/)")
    return (f"{builder!r} has no {split} split to offer; give that split as local files "
            f"(data.data_files.{split}=..., with data.data_files.train)")


def missing_splits(cfg: DataConfig, splits) -> dict[str, str]:
    """The splits among ``splits`` that :func:`build_dataset` would refuse or leave empty, each with the reason and
    what to change (``split_hint``). Decodes no image: for ``hf`` it loads the split table (``datasets`` caches
    it, so the build that follows reads it again at no cost)."""
    cfg.validate()
    wanted = list(dict.fromkeys(splits))
    for split in wanted:
        _check_split(split)
    if cfg.source == "synthetic":
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {s: f"data.num_{s}=0 makes the {s} split empty; {split_hint(cfg, s)}" for s in wanted if sizes[s] == 0}
    _local_files(cfg)
    dsd = _load(cfg)
    found = {}
    for split in wanted:
        try:
            _split_indices(dsd, cfg, split)
        except DataError as err:
            found[split] = str(err)
    return found


class HFImageDataset(Dataset):
    """Images (and labels) from a ``datasets.Dataset``, preprocessed by :func:`preprocess_pil` per item.

    With ``cache_in_memory`` all images are decoded once into uint8 ``images`` (N, C, S, S).
    """

    def __init__(self, hf_dataset, image_column: str, label_column: str | None, cfg: DataConfig,
                 num_classes: int, class_names: list[str] | None, fingerprint: str):
        self._cfg = cfg
        self._image_column = image_column
        self._label_column = label_column
        keep = [image_column] + ([label_column] if label_column else [])
        self._hf = hf_dataset.select_columns(keep)
        self.num_classes = num_classes
        self.class_names = class_names
        self.factor_names = ["label"] if label_column else []
        self.factor_sizes = [num_classes] if label_column else []
        self.fingerprint = fingerprint
        if label_column:
            self.labels = torch.as_tensor(np.asarray(self._hf[label_column]), dtype=torch.int64)
        else:
            self.labels = torch.full((len(self._hf),), -1, dtype=torch.int64)
        self.images: torch.Tensor | None = None
        if cfg.cache_in_memory:
            self.images = torch.stack([self._decode(row[image_column]) for row in self._hf])

    def _decode(self, img: Image.Image, crop: Crop | None = None) -> torch.Tensor:
        c = self._cfg
        return preprocess_pil(img, c.image_size, c.channels, c.resize, crop)

    def __len__(self) -> int:
        return len(self._hf)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item(i)

    def item(self, i: int, view: "View | None" = None) -> dict[str, torch.Tensor]:
        """Item ``i``; ``view`` (training augmentation) crops the source image and mirrors the result."""
        i = int(i)
        crop = view.crop if view is not None else None
        if self.images is not None:
            if crop is not None:
                raise DataError("data.random_crop needs the source images; set data.cache_in_memory=false")
            image = self.images[i]
        else:
            image = self._decode(self._hf[i][self._image_column], crop)
        if view is not None and view.flip:
            image = image.flip(-1)
        label = self.labels[i]
        factors = label.view(1) if self._label_column else torch.zeros(0, dtype=torch.int64)
        return {"image": to_float(image), "label": label, "factors": factors}


def _build_hf(cfg: DataConfig, split: str) -> HFImageDataset:
    import datasets

    files = _local_files(cfg)  # first, so a wrong path gets our message rather than the library's
    dsd = _load(cfg)
    name, rows = _split_indices(dsd, cfg, split)
    ds = dsd[name]
    image_col = _image_column(ds, cfg)
    label_col = _label_column(ds, cfg)
    num_classes, class_names = 0, None
    if label_col is not None:
        feature = ds.features[label_col]
        if isinstance(feature, datasets.ClassLabel):
            num_classes, class_names = feature.num_classes, list(feature.names)
        else:
            # Plain integer labels: the class count must agree across splits, so look at all of them.
            num_classes = 1 + max(int(np.max(np.asarray(d[label_col]))) for d in dsd.values() if len(d))
    if rows is not None:
        ds = ds.select(rows.tolist())
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(_subset(len(ds), cfg.max_samples, cfg.seed, f"cap:{split}").tolist())
    data_dir = cfg.data_dir
    if data_dir is not None and Path(data_dir).expanduser().is_dir():
        data_dir = str(Path(data_dir).expanduser().resolve())
    fingerprint = _hash(
        {
            # A local image folder by its absolute path (names like "images" are too common to tell sets
            # apart); data files by basename and size, so the same files elsewhere match.
            "source": "hf", "path": cfg.path, "data_dir": data_dir,
            "files": {s: [(Path(f).name, os.path.getsize(f)) for f in fs] for s, fs in files.items()},
            "remote_files": {s: p for s, p in (cfg.data_files or {}).items() if s not in files},
            "image_column": image_col, "label_column": label_col, "size": cfg.image_size,
            "channels": cfg.channels, "resize": cfg.resize, "validation_fraction": cfg.validation_fraction,
            "max_samples": cfg.max_samples, "seed": cfg.seed, "split": split, "rows": len(ds),
        }
    )
    return HFImageDataset(ds, image_col, label_col, cfg, num_classes, class_names, fingerprint)


# ----------------------------------------------------------------------------------------- public


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The ``split`` ("train" | "validation" | "test") of the data that ``cfg`` describes.

    Items: ``{"image": (C, S, S) float in [-1, 1], "label": int64, "factors": (F,) int64}``; attributes
    ``num_classes``, ``factor_names``, ``factor_sizes``, ``class_names``, ``fingerprint``, ``labels``.
    """
    _check_split(split)
    cfg.validate()
    if cfg.source == "synthetic":
        n = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}[split]
        if cfg.max_samples is not None:
            n = min(n, cfg.max_samples)
        return SyntheticShapes(n, cfg.image_size, cfg.channels, cfg.seed, split)
    return _build_hf(cfg, split)


@dataclasses.dataclass(frozen=True)
class View:
    """How one training image is augmented: a square ``crop`` of the source (None: the policy's central square)
    and whether it is mirrored left-right."""

    crop: Crop | None
    flip: bool


class Augmented(Dataset):
    """A training split with ``data.random_crop`` / ``data.hflip``: item ``i`` of epoch ``e`` is item ``i`` of
    ``base`` seen through :meth:`view` ``(i, e)``, a pure function of (seed, epoch, index).

    The trainer calls :meth:`set_augment_epoch` before each epoch (``vqgen.core.trainer.Trainer.batch_stream``); the epoch
    lives in shared memory, so data-loader workers (persistent or not) see it. It is not called ``set_epoch``:
    Accelerate would call that too, and some releases pass 0 for the rest of a resumed epoch. Nothing here
    touches the global random state, so resuming a run (which restores the epoch from the step) gives the same
    images.
    """

    def __init__(self, base: Dataset, cfg: DataConfig, seed: int):
        self.base = base
        self.random_crop, self.random_crop_min, self.hflip = cfg.random_crop, cfg.random_crop_min, cfg.hflip
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        for name in ("num_classes", "factor_names", "factor_sizes", "class_names", "fingerprint", "labels"):
            setattr(self, name, getattr(base, name, None))

    def set_augment_epoch(self, epoch: int) -> None:
        """The epoch whose views :meth:`__getitem__` returns."""
        self._epoch.fill_(int(epoch))

    def view(self, index: int, epoch: int) -> View:
        """The crop and flip of item ``index`` in ``epoch``: four uniform draws from a generator seeded by
        (seed, epoch, index), always drawn in the same order whichever options are on."""
        u = np.random.default_rng(_seed_for(self.seed, f"augment:{epoch}:{index}")).random(4)
        crop = None
        if self.random_crop:
            crop = (self.random_crop_min + (1.0 - self.random_crop_min) * float(u[0]), float(u[1]), float(u[2]))
        return View(crop=crop, flip=self.hflip and bool(u[3] < 0.5))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base.item(int(i), self.view(int(i), int(self._epoch)))


def augmented(dataset: Dataset, cfg: DataConfig, seed: int) -> Dataset:
    """``dataset`` (a training split from :func:`build_dataset`) with the augmentations ``cfg`` turns on
    (``random_crop``, ``hflip``), or ``dataset`` itself when none is on. Validation, test and encoding never go
    through this. ``seed``: the run's seed (the crops of run seed s are the same in every run with seed s)."""
    if not (cfg.random_crop or cfg.hflip):
        return dataset
    return Augmented(dataset, cfg, seed)


def make_dataloader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                    num_workers: int = 0) -> DataLoader:
    """A plain ``DataLoader`` over ``ds`` with a seeded generator (reproducible order), ready for
    ``accelerator.prepare``; the default collate stacks the item dicts into batch dicts."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if drop_last and len(ds) < batch_size:
        raise DataError(
            f"the dataset has {len(ds)} images, fewer than batch_size={batch_size} with drop_last: "
            "lower the batch size or use more data"
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, C, H, W) -> uint8 in [0, 255] (values outside are clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save a batch (B, C, H, W), float in [-1, 1] or uint8, as one PNG grid with ``nrow`` images a row."""
    from torchvision.utils import save_image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"save_image_grid expects (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=2)
