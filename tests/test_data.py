"""Tests for tokenizer/data.py: the synthetic shapes set, the hf loader (tiny parquet files and an image
folder written here), preprocessing, splits, the DataLoader and the clear errors."""

from __future__ import annotations

import shutil
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.core.config import ConfigError, from_dict
from vqgen.tokenizer.data import (
    COLOUR_NAMES,
    GRID,
    LUMA,
    PALETTE,
    SHAPE_NAMES,
    DataConfig,
    DataError,
    Augmented,
    SyntheticShapes,
    augmented,
    build_dataset,
    missing_splits,
    denormalize,
    make_dataloader,
    preprocess_pil,
    save_image_grid,
)


# ------------------------------------------------------------------------------------------ helpers


def _synth(**kw) -> DataConfig:
    base = dict(num_train=200, num_validation=50, num_test=50)
    base.update(kw)
    return DataConfig(**base)


def _digit_images(n: int, size: int = 28, mode: str = "L") -> tuple[list[Image.Image], list[int]]:
    """Tiny MNIST-like images: image i has a bright block whose row depends on its label i % 10, and
    its bottom-right pixel holds i + 1 (so rows can be told apart)."""
    images, labels = [], []
    for i in range(n):
        label = i % 10
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        top = label * (size // 10)
        arr[top:top + 3, 4:size - 4] = (255, 128, 0)
        arr[-1, -1] = i + 1
        img = Image.fromarray(arr, "RGB").convert(mode)
        images.append(img)
        labels.append(label)
    return images, labels


def _write_parquet(path, images, labels=None, class_label: bool = True) -> str:
    feats = {"image": datasets.Image()}
    data = {"image": images}
    if labels is not None:
        names = [str(i) for i in range(10)]
        feats["label"] = datasets.ClassLabel(names=names) if class_label else datasets.Value("int64")
        data["label"] = labels
    datasets.Dataset.from_dict(data, features=datasets.Features(feats)).to_parquet(str(path))
    return str(path)


@pytest.fixture
def mnist_like(tmp_path):
    """A tiny parquet pair in the hub MNIST layout (columns image (PNG, mode L) and label (ClassLabel))."""
    train = _write_parquet(tmp_path / "train.parquet", *_digit_images(40))
    test = _write_parquet(tmp_path / "test.parquet", *_digit_images(20))
    return {"train": train, "test": test}


def _hf(tmp_path, files, **kw) -> DataConfig:
    return DataConfig(source="hf", data_files=files, cache_dir=str(tmp_path / "hf-cache"), **kw)


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_items_and_metadata():
    ds = build_dataset(_synth(), "train")
    assert len(ds) == 200
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert item["factors"].shape == (4,) and item["factors"].dtype == torch.int64
    assert ds.factor_names == ["shape", "colour", "position", "scale"]
    assert ds.factor_sizes == [4, 6, GRID * GRID, 2]
    assert ds.num_classes == 24 and len(ds.class_names) == 24
    f = ds.factors_table
    assert torch.equal(ds.labels, f[:, 0] * len(COLOUR_NAMES) + f[:, 1])
    assert ds.class_names[int(ds.labels[0])] == f"{COLOUR_NAMES[f[0, 1]]} {SHAPE_NAMES[f[0, 0]]}"
    # All factor values occur, none out of range.
    for k, size in enumerate(ds.factor_sizes):
        assert set(f[:, k].tolist()) == set(range(size))


def test_synthetic_deterministic_per_seed_and_split():
    a = build_dataset(_synth(), "train")
    b = build_dataset(_synth(), "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.factors_table, b.factors_table)
    assert a.fingerprint == b.fingerprint
    val = build_dataset(_synth(num_validation=200), "validation")
    other_seed = build_dataset(_synth(seed=1), "train")
    assert not torch.equal(a.images, val.images) and val.fingerprint != a.fingerprint
    assert not torch.equal(a.images, other_seed.images) and other_seed.fingerprint != a.fingerprint
    assert build_dataset(_synth(image_size=16), "train").fingerprint != a.fingerprint


@pytest.mark.parametrize("size", [8, 17, 32, 48])
def test_synthetic_colour_pixels_lie_in_position_cell(size):
    ds = SyntheticShapes(120, image_size=size, channels=3, seed=3)
    assert ds.images.shape == (120, 3, size, size)
    cell = size / GRID
    ys = (torch.arange(size) + 0.5).view(size, 1).expand(size, size)
    xs = (torch.arange(size) + 0.5).view(1, size).expand(size, size)
    for img, (shape, colour, pos, scale) in zip(ds.images, ds.factors_table.tolist()):
        fg = (img == PALETTE[colour].view(3, 1, 1)).all(0)  # (S, S) pixels of the shape's colour
        assert fg.any(), "every shape draws at least one pixel"
        row, col = pos // GRID, pos % GRID
        assert (ys[fg] > row * cell).all() and (ys[fg] < (row + 1) * cell).all()
        assert (xs[fg] > col * cell).all() and (xs[fg] < (col + 1) * cell).all()
        # Everything else is the dark background (grey, below every palette colour).
        rest = img[:, ~fg]
        assert (rest[0] == rest[1]).all() and (rest[1] == rest[2]).all() and rest.max() < 40


def test_synthetic_scale_and_shape_change_the_mask():
    ds = SyntheticShapes(2000, image_size=32, seed=0)
    fg = (ds.images.int().sum(1) > 3 * 40)  # (N, S, S): foreground pixels
    area = fg.flatten(1).sum(1).float()
    shape, scale = ds.factors_table[:, 0], ds.factors_table[:, 3]
    for s in range(len(SHAPE_NAMES)):
        small = area[(shape == s) & (scale == 0)].mean()
        large = area[(shape == s) & (scale == 1)].mean()
        assert large > 1.5 * small
    # At the large scale each shape has its own mean area, so the shapes really differ.
    per_shape = [area[(shape == s) & (scale == 1)].mean().item() for s in range(len(SHAPE_NAMES))]
    assert len({round(a) for a in per_shape}) == len(SHAPE_NAMES)


def test_synthetic_grey_is_luminance_and_colours_stay_distinct():
    rgb = build_dataset(_synth(), "test")
    grey = build_dataset(_synth(channels=1), "test")
    assert grey.images.shape == (50, 1, 32, 32)
    assert torch.equal(rgb.factors_table, grey.factors_table)
    expected = (rgb.images.float() * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True).round()
    assert torch.equal(grey.images.float(), expected)
    luma = (PALETTE.float() @ LUMA).round()
    gaps = (luma.view(-1, 1) - luma.view(1, -1)).abs() + 1000 * torch.eye(len(luma))
    assert gaps.min() >= 20 and luma.min() >= 45  # distinct from each other and from the background


def test_synthetic_10k_generation_is_fast():
    start = time.perf_counter()
    ds = build_dataset(DataConfig(), "train")
    elapsed = time.perf_counter() - start
    assert len(ds) == 10000 and ds.images.dtype == torch.uint8
    assert elapsed < 30.0  # loose: ~0.1 s measured on one core; only catches a pathological slowdown


def test_max_samples_caps_synthetic():
    assert len(build_dataset(_synth(max_samples=7), "train")) == 7


# --------------------------------------------------------------------------------------------- hf


def test_hf_parquet_mnist_layout_splits_and_labels(tmp_path, mnist_like):
    # Same layout as ../shared/data/mnist/{train,test}.parquet: no validation split, so it is carved.
    cfg = _hf(tmp_path, mnist_like, channels=1, image_size=28, validation_fraction=0.25)
    train, val, test = (build_dataset(cfg, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (30, 10, 20)
    assert train.num_classes == 10 and train.class_names == [str(i) for i in range(10)]
    assert train.factor_names == ["label"] and train.factor_sizes == [10]
    item = test[3]
    assert item["image"].shape == (1, 28, 28) and item["label"].item() == 3
    assert torch.equal(item["factors"], torch.tensor([3]))
    # The carve is a deterministic partition of train.
    all_labels = sorted(train.labels.tolist() + val.labels.tolist())
    assert all_labels == sorted(i % 10 for i in range(40))
    again = build_dataset(cfg, "validation")
    assert torch.equal(again.labels, val.labels) and again.fingerprint == val.fingerprint
    assert len({train.fingerprint, val.fingerprint, test.fingerprint}) == 3
    # Rows of validation and train are disjoint and together all source rows (ids from the marker pixel).
    def row_ids(ds):
        return {round((ds[i]["image"][0, -1, -1].item() + 1) * 127.5) - 1 for i in range(len(ds))}

    assert row_ids(train) | row_ids(val) == set(range(40)) and not row_ids(train) & row_ids(val)


def test_hf_path_inferred_and_explicit_builder_agree(tmp_path, mnist_like):
    inferred = build_dataset(_hf(tmp_path, mnist_like, channels=1), "test")
    explicit = build_dataset(_hf(tmp_path, mnist_like, channels=1, path="parquet"), "test")
    assert torch.equal(inferred[5]["image"], explicit[5]["image"])


def test_hf_resize_keeps_geometry_and_range(tmp_path, mnist_like):
    ds = build_dataset(_hf(tmp_path, mnist_like, channels=1, image_size=56), "test")
    img = ds[0]["image"][0]  # label 0: bright rows 0..2 of 28, now rows 0..5 of 56
    assert img.shape == (56, 56)
    assert img[:6, 12:44].mean() > 0.0 and img[10:, :].max() < -0.9
    assert img.min() >= -1 and img.max() <= 1


def test_grey_and_rgb_conversion():
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 100, 50
    rgb_img = Image.fromarray(arr, "RGB")
    grey = preprocess_pil(rgb_img, 16, 1)
    assert grey.shape == (1, 16, 16) and grey.dtype == torch.uint8
    assert abs(int(grey[0, 0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1
    back = preprocess_pil(rgb_img, 16, 3)
    assert torch.equal(back[:, 0, 0], torch.tensor([200, 100, 50], dtype=torch.uint8))
    l_img = Image.fromarray(np.full((16, 16), 77, dtype=np.uint8), "L")
    assert (preprocess_pil(l_img, 16, 3) == 77).all()  # grey -> RGB replicates the channel
    rgba = Image.fromarray(np.concatenate([arr, np.full((16, 16, 1), 9, np.uint8)], -1), "RGBA")
    assert preprocess_pil(rgba, 16, 3).shape == (3, 16, 16)


def test_policies_on_wide_image():
    arr = np.zeros((20, 60), dtype=np.uint8)  # (H, W): a bright middle third, dark sides
    arr[:, 20:40] = 255
    img = Image.fromarray(arr, "L")
    squashed = preprocess_pil(img, 10, 1, "stretch")
    for policy in ("resize", "center_crop"):  # both keep the aspect ratio: the bright middle square fills the frame
        cropped = preprocess_pil(img, 10, 1, policy)
        assert cropped.shape == (1, 10, 10)
        assert cropped[0, :, 1:9].min() > 220, policy
    assert squashed.shape == (1, 10, 10)
    assert squashed[0, :, 0].max() < 30 and squashed[0, :, 5].min() > 220  # sides dark, middle bright


def _disc_image(width: int, height: int) -> Image.Image:
    """A white disc of radius 0.4 * short side at the centre of a black RGB image, with red bands outside the
    central square (they must not show after a centre crop)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    r = 0.4 * min(width, height)
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[(xs - width / 2) ** 2 + (ys - height / 2) ** 2 <= r * r] = 255
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    outside = np.ones((height, width), bool)
    outside[top:top + side, left:left + side] = False
    arr[outside] = (255, 0, 0)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("width, height", [(37, 53), (53, 37)])
def test_default_resize_keeps_aspect_ratio_on_37x53(width, height):
    """Short side to S, then the central S x S: the disc stays round and centred, nothing outside the central
    square shows; torchvision's Resize(S) + CenterCrop(S) gives the same image up to its half-pixel rounding."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    img, size = _disc_image(width, height), 32
    out = preprocess_pil(img, size, 3)  # the default policy
    assert out.shape == (3, size, size)
    disc = (out.float().mean(0) > 127).float()  # (S, S)
    rows, cols = disc.sum(1).nonzero(), disc.sum(0).nonzero()
    extent = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
    assert abs(extent[0] - extent[1]) <= 1 and abs(extent[0] - 0.8 * size) <= 2  # round, 0.8 of the frame
    ys, xs = torch.nonzero(disc, as_tuple=True)
    assert abs(float(ys.float().mean()) + 0.5 - size / 2) < 0.5 and abs(float(xs.float().mean()) + 0.5 - size / 2) < 0.5
    red = (out[0].int() - out[1].int() > 100)
    assert not red.any()  # the red bands lie outside the central square
    reference = TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.BICUBIC), [size, size])
    reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float()
    assert (reference - out.float()).abs().mean() < 12  # rounding of the crop offset: at most half a pixel
    squashed = preprocess_pil(img, size, 3, "stretch")  # the old default squashes the disc into an ellipse
    sq = (squashed.float().mean(0) > 127) & ~(squashed[0].int() - squashed[1].int() > 100)
    rows, cols = sq.sum(1).nonzero(), sq.sum(0).nonzero()
    assert abs((int(rows.max() - rows.min()) + 1) - (int(cols.max() - cols.min()) + 1)) >= 5


@pytest.mark.parametrize("side, size, mode", [(28, 32, "L"), (32, 32, "RGB"), (64, 32, "RGB"), (37, 16, "L"),
                                              (17, 16, "RGBA")])
def test_square_images_are_unchanged_by_the_new_default(side, size, mode):
    """For square sources (MNIST, CIFAR-10) the default gives exactly the whole image scaled, as before."""
    rng = np.random.default_rng(side)
    channels = 1 if mode == "L" else 3
    arr = rng.integers(0, 256, (side, side, len(mode)) if mode != "L" else (side, side), dtype=np.uint8)
    img = Image.fromarray(arr, mode)
    old = img.convert("L" if channels == 1 else "RGB")
    if old.size != (size, size):
        old = old.resize((size, size), Image.BICUBIC)
    old = torch.from_numpy(np.asarray(old).copy())
    old = old.unsqueeze(0) if channels == 1 else old.permute(2, 0, 1)
    for policy in ("resize", "stretch", "center_crop"):
        assert torch.equal(preprocess_pil(img, size, channels, policy), old), policy


def test_hf_image_folder(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 6), ("test", 3)):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = np.full((24, 40, 3), 60 + 120 * k, dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(root / split / cls / f"{i}.png")
    cfg = DataConfig(source="hf", data_dir=str(root), cache_dir=str(tmp_path / "c"), image_size=16,
                     resize="center_crop", validation_fraction=0.25)
    train, val, test = (build_dataset(cfg, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (9, 3, 6)
    assert test.class_names == ["cat", "dog"] and test.num_classes == 2
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 16, 16)
        expected = (60 + 120 * item["label"].item()) / 127.5 - 1
        assert torch.allclose(item["image"], torch.full((3, 16, 16), expected), atol=0.02)


def test_hf_unlabeled_and_integer_labels(tmp_path):
    images, labels = _digit_images(12)
    plain = {"train": _write_parquet(tmp_path / "u.parquet", images)}
    ds = build_dataset(_hf(tmp_path, plain, channels=1, validation_fraction=0.0), "train")
    assert ds.num_classes == 0 and ds.factor_names == [] and ds.class_names is None
    batch = next(iter(make_dataloader(ds, 4, shuffle=False)))
    assert batch["factors"].shape == (4, 0) and (batch["label"] == -1).all()

    ints = {
        "train": _write_parquet(tmp_path / "i.parquet", images[:6], [0, 1, 2, 0, 1, 2], class_label=False),
        "test": _write_parquet(tmp_path / "j.parquet", images[:2], [7, 1], class_label=False),
    }
    train = build_dataset(_hf(tmp_path, ints, channels=1, validation_fraction=0.0), "train")
    # Plain integer labels: the class count comes from all splits, so every split agrees.
    assert train.num_classes == 8 and train.factor_sizes == [8] and train.class_names is None


def test_hf_cache_in_memory_matches_lazy_and_max_samples(tmp_path, mnist_like):
    kw = dict(max_samples=8, channels=1, image_size=28)
    lazy = build_dataset(_hf(tmp_path, mnist_like, **kw), "test")
    cached = build_dataset(_hf(tmp_path, mnist_like, cache_in_memory=True, **kw), "test")
    assert len(lazy) == len(cached) == 8 and cached.images.shape == (8, 1, 28, 28)
    for i in range(8):
        assert torch.equal(lazy[i]["image"], cached[i]["image"])
        assert lazy[i]["label"] == cached[i]["label"]
    # A seeded random subset in source order, not the first rows (ids from the marker pixel).
    ids = [int(cached.images[i, 0, -1, -1]) - 1 for i in range(8)]
    assert ids == sorted(ids) and ids != list(range(8)) and len(set(ids)) == 8


def test_hf_fingerprint_independent_of_file_location(tmp_path, mnist_like):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copies = {s: str(shutil.copy(p, moved / f"{s}.parquet")) for s, p in mnist_like.items()}
    a = build_dataset(_hf(tmp_path, mnist_like), "test")
    b = build_dataset(_hf(tmp_path, copies), "test")
    c = build_dataset(_hf(tmp_path, mnist_like, image_size=16), "test")
    assert a.fingerprint == b.fingerprint != c.fingerprint


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data, match",
    [
        ({"image_size": 4}, "image_size"),
        ({"image_size": "32x32"}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"source": "imagenet"}, "source"),
        ({"resize": "pad"}, "resize"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"max_samples": 0}, "max_samples"),
        ({"path": "parquet"}, "source=hf"),
        ({"source": "hf"}, "data.path"),
        ({"source": "hf", "data_files": {"dev": "x.parquet"}}, "data_files"),
        ({"colour": 3}, "colour"),
    ],
)
def test_bad_config_gives_one_clear_error(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DataConfig, data)


def test_from_dict_builds_a_valid_config():
    cfg = from_dict(DataConfig, {"source": "hf", "data_files": {"train": "a.parquet"}, "channels": 1})
    assert cfg.data_files == {"train": "a.parquet"} and cfg.channels == 1


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split 'val'"):
        build_dataset(_synth(), "val")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        build_dataset(_hf(tmp_path, {"train": str(tmp_path / "nope.parquet")}), "train")
    with pytest.raises(DataError, match="not a folder"):
        build_dataset(DataConfig(source="hf", data_dir=str(tmp_path / "nope")), "train")


def test_missing_split_and_no_carve(tmp_path, mnist_like):
    with pytest.raises(DataError, match="no 'test' split"):
        build_dataset(_hf(tmp_path, {"train": mnist_like["train"]}), "test")
    with pytest.raises(DataError, match="validation_fraction"):
        build_dataset(_hf(tmp_path, mnist_like, validation_fraction=0.0), "validation")


def test_no_image_column(tmp_path):
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(str(path))
    with pytest.raises(DataError, match="no image column found"):
        build_dataset(_hf(tmp_path, {"train": str(path)}, validation_fraction=0.0), "train")


def test_wrong_image_or_label_column(tmp_path, mnist_like):
    with pytest.raises(DataError, match="image_column='img'"):
        build_dataset(_hf(tmp_path, mnist_like, image_column="img"), "test")
    with pytest.raises(DataError, match="does not hold images"):
        build_dataset(_hf(tmp_path, mnist_like, image_column="label"), "test")
    with pytest.raises(DataError, match="label_column='y'"):
        build_dataset(_hf(tmp_path, mnist_like, label_column="y"), "test")


def test_unknown_file_format(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"\0")
    with pytest.raises(DataError, match="cannot tell the format"):
        build_dataset(_hf(tmp_path, {"train": str(path)}), "train")


# --------------------------------------------------------------------------------- loader & images


def test_dataloader_batches_and_seeded_order():
    ds = build_dataset(_synth(), "train")
    batch = next(iter(make_dataloader(ds, 16, shuffle=False)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["label"].shape == (16,)
    assert batch["factors"].shape == (16, 4)
    first = [next(iter(make_dataloader(ds, 16, shuffle=True, seed=s)))["label"] for s in (5, 5, 6)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert len(make_dataloader(ds, 64, shuffle=True, drop_last=True)) == 3
    with pytest.raises(DataError, match="batch_size"):
        make_dataloader(ds, 0, shuffle=True)
    with pytest.raises(DataError, match="fewer than batch_size"):
        make_dataloader(ds, 500, shuffle=True, drop_last=True)


def test_dataloader_under_accelerate():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    ds = build_dataset(_synth(num_train=40), "train")
    loader = accelerator.prepare(make_dataloader(ds, 8, shuffle=True, seed=0))
    labels = torch.cat([b["label"] for b in loader])
    assert sorted(labels.tolist()) == sorted(ds.labels.tolist())


def test_denormalize_and_save_image_grid(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert denormalize(x).flatten().tolist() == [0, 128, 255, 255]
    ds = build_dataset(_synth(), "test")
    images = torch.stack([ds[i]["image"] for i in range(6)])
    assert torch.equal(denormalize(images), ds.images[:6])  # exact round trip of the uint8 data
    path = tmp_path / "sub" / "grid.png"
    save_image_grid(images, path, nrow=3)
    saved = np.asarray(Image.open(path))
    assert saved.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 2 rows x 3 columns of 32 px with 2 px padding
    assert np.array_equal(saved[2:34, 2:34], ds.images[0].permute(1, 2, 0).numpy())
    save_image_grid(ds.images[:4], tmp_path / "u8.png", nrow=2)  # uint8 input works too
    with pytest.raises(DataError, match="expects"):
        save_image_grid(images[0], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------- augmentation


def _epoch_images(ds, epoch: int, n: int = 8) -> torch.Tensor:
    ds.set_augment_epoch(epoch)
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_augmentation_off_returns_the_split_itself():
    ds = build_dataset(_synth(), "train")
    assert augmented(ds, _synth(), seed=0) is ds


def test_hflip_mirrors_about_half_the_images_and_keeps_labels():
    cfg = _synth(hflip=True)
    base = build_dataset(cfg, "train")
    aug = augmented(base, cfg, seed=3)
    assert isinstance(aug, Augmented) and len(aug) == len(base) and aug.num_classes == base.num_classes
    aug.set_augment_epoch(0)
    flipped = 0
    for i in range(64):
        item, plain = aug[i], base[i]
        mirrored = torch.equal(item["image"], plain["image"].flip(-1))
        assert mirrored or torch.equal(item["image"], plain["image"])
        assert mirrored == aug.view(i, 0).flip
        flipped += mirrored
        assert item["label"] == plain["label"] and torch.equal(item["factors"], plain["factors"])
    assert 16 <= flipped <= 48


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    """The same (seed, epoch, index) gives the same image in any order and in another object (a resumed run);
    another epoch or seed gives other crops; the global random state is neither read nor moved."""
    cfg = _synth(random_crop=True, random_crop_min=0.6, hflip=True)
    base = build_dataset(cfg, "train")
    a, b = augmented(base, cfg, seed=0), augmented(base, cfg, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _epoch_images(a, 1)
    assert torch.equal(torch.get_rng_state(), state)
    b.set_augment_epoch(1)
    backwards = torch.stack([b[i]["image"] for i in reversed(range(8))]).flip(0)
    assert torch.equal(first, backwards)
    torch.manual_seed(999)  # another global state changes nothing
    assert torch.equal(first, _epoch_images(a, 1))
    assert not torch.equal(first, _epoch_images(a, 2))
    assert not torch.equal(first, _epoch_images(augmented(base, cfg, seed=1), 1))
    plain = torch.stack([base[i]["image"] for i in range(8)])
    assert not torch.equal(first, plain)
    assert first.shape == plain.shape and first.min() >= -1 and first.max() <= 1


def test_random_crop_on_real_images_cuts_squares_of_the_source(tmp_path):
    """A random crop of a 48x32 gradient: a square of 0.5-1 of the short side somewhere in the image, scaled to S
    (so the horizontal ramp it shows is a sub-range of the source's)."""
    ramp = np.tile(np.linspace(0, 255, 48, dtype=np.float64), (32, 1)).astype(np.uint8)  # (H=32, W=48)
    path = _write_parquet(tmp_path / "ramp.parquet", [Image.fromarray(ramp, "L")] * 6)
    cfg = _hf(tmp_path, {"train": path}, channels=1, image_size=16, validation_fraction=0.0, random_crop=True,
              random_crop_min=0.5)
    base = build_dataset(cfg, "train")
    aug = augmented(base, cfg, seed=0)
    spans = set()
    for epoch in range(3):
        aug.set_augment_epoch(epoch)
        for i in range(len(aug)):
            img = (aug[i]["image"][0] + 1) * 127.5  # (16, 16) in [0, 255]
            left, right = float(img[:, 0].mean()), float(img[:, -1].mean())
            crop = aug.view(i, epoch).crop
            side = crop[0] * 32  # source pixels
            expect_left = crop[1] * (48 - side) * 255 / 47
            assert abs(left - expect_left) < 12 and 0.5 <= crop[0] <= 1
            assert (img[:, 1:].mean(0) >= img[:, :-1].mean(0) - 1).all()  # still a left-to-right ramp
            spans.add(round(right - left))
    assert len(spans) > 3  # crops of several sizes


def test_augmented_views_reach_data_loader_workers():
    """The epoch lives in shared memory: persistent workers see set_augment_epoch."""
    cfg = _synth(hflip=True, random_crop=True)
    aug = augmented(build_dataset(cfg, "train"), cfg, seed=0)
    loader = make_dataloader(aug, batch_size=8, shuffle=False, num_workers=1)
    for epoch in (0, 1):
        aug.set_augment_epoch(epoch)
        got = next(iter(loader))["image"]
        assert torch.equal(got, _epoch_images(aug, epoch))


@pytest.mark.parametrize("data, match", [
    ({"random_crop": True, "resize": "stretch"}, "stretch"),
    ({"random_crop_min": 0.0}, "random_crop_min"),
    ({"random_crop": True, "cache_in_memory": True, "source": "hf", "data_dir": "x"}, "cache_in_memory"),
])
def test_augmentation_settings_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DataConfig, data)


# ----------------------------------------------------------------------------------- missing splits


def test_missing_splits_per_source(tmp_path, mnist_like):
    assert missing_splits(_synth(), ["train", "validation", "test"]) == {}
    assert "data.num_test" in missing_splits(_synth(num_test=0), ["test"])["test"]
    files = _hf(tmp_path, {"train": mnist_like["train"]})
    found = missing_splits(files, ["train", "validation", "test"])
    assert list(found) == ["test"] and "data.data_files.test" in found["test"]  # validation is carved from train
    root = tmp_path / "folder"
    for k, cls in enumerate(("a", "b")):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / "train" / cls / f"{i}.png")
    folder = DataConfig(source="hf", data_dir=str(root), cache_dir=str(tmp_path / "c"), validation_fraction=0.25)
    found = missing_splits(folder, ["train", "validation", "test"])
    assert list(found) == ["test"]
    assert f"add a folder {root / 'test'}/" in found["test"] and "data_files" not in found["test"]
    with pytest.raises(DataError, match=f"add a folder {root / 'test'}/"):
        build_dataset(folder, "test")

