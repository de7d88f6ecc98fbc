"""The label-free (contrastive) feature extractor: trains without labels, is cached, and behaves as a
feature space for FID (batch-size independent features, FID of a set with itself ~0)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import vqgen.eval.contrastive as contrastive
from vqgen.eval.contrastive import (
    ContrastiveConfig,
    augment,
    fit_contrastive,
    knn_accuracy,
    nt_xent,
    offline_contrastive,
)
from vqgen.eval.fid import fid_from_features, images_to_uint8, load_feature_space
from vqgen.tokenizer.data import DataConfig, build_dataset

TINY_DATA = DataConfig(image_size=16, num_train=256, num_validation=0, num_test=96)
TINY = ContrastiveConfig(width=8, feature_dim=16, projection_dim=8, steps=30, batch_size=32)


class LabelTrap(torch.utils.data.Dataset):
    """Images of a data set whose labels (item key, ``labels``, classes, factors) raise when read."""

    def __init__(self, dataset):
        self._images = dataset

    def __len__(self):
        return len(self._images)

    def __getitem__(self, i):
        return _ImageOnly(image=self._images[i]["image"])

    def __getattr__(self, name):
        if name in ("labels", "num_classes", "factor_sizes", "factor_names", "factors_table"):
            raise AssertionError(f"the contrastive extractor read {name!r} while training")
        raise AttributeError(name)


class _ImageOnly(dict):
    def __getitem__(self, key):
        if key != "image":
            raise AssertionError(f"the contrastive extractor read item[{key!r}] while training")
        return super().__getitem__(key)


@pytest.fixture(scope="module")
def space(cache):
    return load_feature_space("contrastive", data_cfg=TINY_DATA, contrastive=TINY)


@pytest.fixture(scope="module")
def test_images():
    ds = build_dataset(TINY_DATA, "test")
    return torch.stack([ds[i]["image"] for i in range(len(ds))])  # (96, 3, 16, 16) in [-1, 1]


def test_training_never_reads_labels():
    trap = LabelTrap(build_dataset(TINY_DATA, "train"))
    fit = fit_contrastive(trap, TINY)
    backbone, info = fit.backbone, fit.info
    assert fit.train_images.dtype == torch.uint8 and fit.train_images.shape == (256, 3, 16, 16)
    assert info["num_train_images"] == 256 and info["train_steps"] == 30
    assert info["architecture"]["head_sizes"] == [] and not backbone.heads
    # The loss starts near log(2B - 1) (no view is told from the others) and must fall below it.
    assert math.isfinite(info["final_train_loss"]) and info["final_train_loss"] < math.log(2 * 32 - 1)
    features, _ = backbone(torch.zeros(2, 3, 16, 16))
    assert features.shape == (2, 16)


def test_extractor_is_cached_with_its_knn_check(space, cache, monkeypatch):
    meta = space.describe()
    assert meta["name"] == "contrastive" and meta["torch_fidelity_name"] == "vqgen-contrastive"
    assert meta["label_free"] is True and len(meta["weights_sha256"]) == 64
    assert 0.0 <= meta["knn_accuracy"] <= 1.0
    assert meta["knn"]["k"] == 20 and meta["knn"]["test_split"] == "test" and meta["knn"]["num_test_images"] == 96
    assert str(cache / "contrastive") in space.weights_path

    def no_training(*args, **kwargs):
        raise AssertionError("a cached extractor was trained again")

    monkeypatch.setattr(contrastive, "train_contrastive", no_training)
    assert str(offline_contrastive(TINY_DATA, TINY)) == space.weights_path  # a cache hit
    again = load_feature_space("contrastive", data_cfg=TINY_DATA, contrastive=TINY)
    assert again.weights_sha256 == space.weights_sha256
    with pytest.raises(AssertionError, match="trained again"):  # another config is another cache entry
        offline_contrastive(TINY_DATA, dataclasses.replace(TINY, temperature=0.5))


def test_features_are_independent_of_batch_size(space, test_images):
    x = images_to_uint8(test_images)
    small, large = space.extract(x, batch_size=7), space.extract(x, batch_size=96)
    assert set(small) == {"features"} and small["features"].shape == (96, 16)
    torch.testing.assert_close(small["features"], large["features"], rtol=1e-5, atol=1e-5)


def test_fid_of_a_set_with_itself_is_zero_and_larger_for_different_sets(space, test_images):
    base = space.extract(images_to_uint8(test_images))["features"]
    assert abs(fid_from_features(base, base)) < 1e-6
    train = build_dataset(TINY_DATA, "train")
    same_kind = space.extract(images_to_uint8(torch.stack([train[i]["image"] for i in range(96)])))["features"]
    g = torch.Generator().manual_seed(0)
    noisy = space.extract(images_to_uint8(test_images + 0.6 * torch.randn(test_images.shape, generator=g)))["features"]
    assert 0 < fid_from_features(base, same_kind) < fid_from_features(base, noisy)


def test_augment_gives_seeded_views_in_range():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = ContrastiveConfig()
    a = augment(x, torch.Generator().manual_seed(1), cfg)
    b = augment(x, torch.Generator().manual_seed(1), cfg)
    c = augment(x, torch.Generator().manual_seed(2), cfg)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.round((a + 1) * 127.5) / 127.5 - 1, a)  # on the uint8 grid, like eval inputs
    # A constant image stays constant under crops; brightness scales it, contrast has nothing to stretch.
    grey = torch.full((4, 1, 8, 8), 153 / 127.5 - 1)  # grey level 153 of 255
    out = augment(grey, torch.Generator().manual_seed(0), ContrastiveConfig(brightness=0.0))
    torch.testing.assert_close(out, grey)


def test_nt_xent_matches_the_formula():
    t = 0.5
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e1, e2, e1, e2])  # views 0 and 2 agree, 1 and 3 agree, the two images are orthogonal
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0.0)))
    assert float(nt_xent(z, t)) == pytest.approx(expected)
    swapped = torch.stack([e1, e2, e2, e1])  # each view's partner is the other image: a larger loss
    assert float(nt_xent(swapped, t)) > expected
    with pytest.raises(ValueError, match="even number"):
        nt_xent(z[:3], t)


def test_knn_accuracy_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[5.0, 0.5], [0.0, 3.0]])  # cosine: scale does not matter
    assert knn_accuracy(train, train_labels, test, torch.tensor([0, 1]), k=1) == 1.0
    # k = 3: the first test point's neighbours are 0, 0, 1 -> class 0; the second's are all class 1.
    assert knn_accuracy(train, train_labels, test, torch.tensor([0, 1]), k=3) == 1.0
    assert knn_accuracy(train, train_labels, test, torch.tensor([1, 1]), k=3) == 0.5
    # k = 4 on the first point: votes 2 : 2, broken by the larger summed similarity (class 0).
    assert knn_accuracy(train, train_labels, test[:1], torch.tensor([0]), k=4) == 1.0


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="contrastive.min_crop_area"):
        ContrastiveConfig(min_crop_area=0.0).validate()
    with pytest.raises(ValueError, match="contrastive.batch_size"):
        ContrastiveConfig(batch_size=1).validate()
