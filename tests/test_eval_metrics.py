"""Tests of the eval library's math: FID/KID/PRC against torch-fidelity, PRDC by hand, diversity, SSIM."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch_fidelity

from vqgen.eval.diversity import (
    LatentMoments,
    code_histogram,
    histogram_divergence,
    mean_pairwise_distance,
    mode_coverage,
    perplexity,
    selection_histogram,
    spread_stats,
    usage,
)
from vqgen.eval.features import ClassifierConfig, classifier_task, offline_classifier
from vqgen.tokenizer.layout import CodebookLayout
from vqgen.eval.fid import (
    FeatureExtractorError,
    cached_reference,
    fid_from_features,
    images_to_uint8,
    kid,
    load_feature_space,
    precision_recall,
    reference_key,
)
from vqgen.eval.prdc import knn_radii, prdc
from vqgen.eval.reconstruction import ReconstructionMeter, psnr, ssim
from vqgen.tokenizer.data import DataConfig, build_dataset

TINY_DATA = DataConfig(image_size=16, num_train=256, num_validation=0, num_test=96)
TINY_CLASSIFIER = ClassifierConfig(width=8, feature_dim=16, max_steps=30, batch_size=32)


@pytest.fixture(scope="module")
def space(cache):
    return load_feature_space("offline", data_cfg=TINY_DATA, classifier=TINY_CLASSIFIER)


@pytest.fixture(scope="module")
def test_images():
    ds = build_dataset(TINY_DATA, "test")
    return torch.stack([ds[i]["image"] for i in range(len(ds))])  # (96, 3, 16, 16) in [-1, 1]


# ------------------------------------------------------------------------------------------------ FID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(space, test_images):
    base = space.extract(images_to_uint8(test_images))["features"]
    assert abs(fid_from_features(base, base)) < 1e-6
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (0.05, 0.2, 0.6):
        noisy = test_images + sigma * torch.randn(test_images.shape, generator=g)
        fids.append(fid_from_features(base, space.extract(images_to_uint8(noisy))["features"]))
    assert 0 < fids[0] < fids[1] < fids[2]


def test_fid_kid_prc_equal_torch_fidelity_on_the_same_features(space, test_images):
    real = images_to_uint8(test_images[:48])
    g = torch.Generator().manual_seed(1)
    fake = images_to_uint8(test_images[48:] + 0.2 * torch.randn(test_images[48:].shape, generator=g))

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), fid=True, kid=True, prc=True, cuda=False, cache=False,
        verbose=False, save_cpu_ram=True, feature_extractor=space.registry_name,
        feature_extractor_weights_path=space.weights_path, kid_subset_size=20, kid_subsets=10, batch_size=16,
    )
    f_fake, f_real = space.extract(fake)["features"], space.extract(real)["features"]
    assert fid_from_features(f_fake, f_real) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    kid_mean, kid_std = kid(f_fake, f_real, subsets=10, subset_size=20)
    assert kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-7)
    precision, recall = precision_recall(f_fake, f_real, k=3)
    assert (precision, recall) == (pytest.approx(theirs["precision"]), pytest.approx(theirs["recall"]))


def test_features_are_independent_of_batch_size(space, test_images):
    x = images_to_uint8(test_images)
    small, large = space.extract(x, batch_size=7), space.extract(x, batch_size=96)
    for key in ("features", "logits"):
        torch.testing.assert_close(small[key], large[key], rtol=1e-5, atol=1e-5)


def test_inception_with_missing_weights_path_fails_clearly(tmp_path):
    with pytest.raises(FeatureExtractorError, match="weights_path .* does not exist"):
        load_feature_space("inception", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FeatureExtractorError, match="choose one of"):
        load_feature_space("clip")


def test_offline_classifier_is_cached_with_its_accuracy(space, cache):
    meta = space.info
    assert meta["task"] == "factors"
    assert set(meta["test_accuracy"]) == {"shape", "colour", "position", "scale"}
    assert all(0.0 <= a <= 1.0 for a in meta["test_accuracy"].values())
    weights = offline_classifier(TINY_DATA, TINY_CLASSIFIER)
    assert str(weights) == space.weights_path  # a cache hit: same file, no retraining
    assert str(cache) in space.weights_path


def test_unlabelled_data_falls_back_to_rotation():
    unlabelled = SimpleNamespace(num_classes=0, factor_sizes=[], factor_names=[])
    labelled = SimpleNamespace(num_classes=10, factor_sizes=[10], factor_names=["label"])
    assert classifier_task(unlabelled) == ("rotation", [("rotation", 4)])
    assert classifier_task(labelled) == ("factors", [("label", 10)])


def test_reference_cache_key_follows_the_extractor_weights(space, tmp_path):
    key = reference_key("data", "test", space, 96)
    other = reference_key("data", "test", SimpleNamespace(registry_name=space.registry_name, weights_sha256="0" * 64), 96)
    assert key != other and key != reference_key("data", "test", space, 95)
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.randn(10, 4, dtype=torch.float64)}

    first, hit1 = cached_reference(key, compute, tmp_path)
    second, hit2 = cached_reference(key, compute, tmp_path)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    torch.testing.assert_close(first["features"], second["features"])
    assert second["sigma"].shape == (4, 4)


# ------------------------------------------------------------------------------------------------ PRDC


def _line(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs], dtype=torch.float64)


def test_prdc_matches_hand_computed_values():
    # k = 1. Real radii: 0->1, 1->1, 3->2, 6->1, 7->1; fake radii: 0.5->4, 4.5->4, 10->5.5.
    real, fake = _line(0, 1, 3, 6, 7), _line(0.5, 4.5, 10)
    torch.testing.assert_close(knn_radii(real, 1), torch.tensor([1.0, 1, 2, 1, 1], dtype=torch.float64))
    out = prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(2 / 3)  # 0.5 (balls 0, 1) and 4.5 (ball 3); 10 is in none
    assert out["density"] == pytest.approx((2 + 1 + 0) / 3)
    assert out["coverage"] == pytest.approx(3 / 5)  # balls of 0, 1, 3 hold a fake point; 6 and 7 do not
    assert out["recall"] == pytest.approx(1.0)  # every real point is within 4 of 0.5 or 4.5, or 5.5 of 10
    assert precision_recall(fake, real, k=1) == (pytest.approx(2 / 3), pytest.approx(1.0))
    assert prdc(real, fake, k=1, chunk=2) == out


def test_prdc_of_identical_sets():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    out = prdc(x, x.clone(), k=3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


# ------------------------------------------------------------------------------------------------ diversity


def test_histogram_statistics():
    counts = torch.tensor([5, 5, 5, 5, 0, 0, 0, 0])
    assert perplexity(counts) == pytest.approx(4.0)
    assert usage(counts) == 0.5
    same = histogram_divergence(counts, counts)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["js"] == pytest.approx(0.0, abs=1e-12)
    disjoint = histogram_divergence(torch.tensor([1, 0]), torch.tensor([0, 1]))
    assert disjoint["js"] == pytest.approx(math.log(2)) and disjoint["kl"] > 10
    assert code_histogram(torch.tensor([[0, 2], [2, 2]]), 3).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="code ids"):
        code_histogram(torch.tensor([3]), 3)


def test_mean_pairwise_distance_equals_cdist_mean():
    codes = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    exact = float(torch.cdist(codes.double(), codes.double()).mean())
    assert mean_pairwise_distance(codes, chunk=64) == pytest.approx(exact, rel=1e-9)
    assert mean_pairwise_distance(codes, max_codes=200) == pytest.approx(exact, rel=0.05)


def test_latent_moments_merge_batches_and_spread_ratio():
    z = torch.randn(4, 6, 6, 3, generator=torch.Generator().manual_seed(0))  # (B, h, w, D)
    moments = LatentMoments(3)
    for part in z.split(1):
        moments.update(part)
    flat = z.reshape(-1, 3).double()
    torch.testing.assert_close(moments.covariance(), torch.cov(flat.T))
    stats = spread_stats(0.5 * flat, moments.covariance())  # codes = the latents shrunk by 2
    assert stats["trace_ratio"] == pytest.approx(0.25)
    assert 1.0 <= stats["effective_rank_latents"] <= 3.0
    assert stats["effective_rank_codes"] == pytest.approx(stats["effective_rank_latents"])


def test_selection_histogram_maps_joint_ids_to_codebooks():
    layout = CodebookLayout((4, 8, 16), (1, 7))
    ids = torch.tensor([0, 3, 4, 11, 12, 27, 27])
    assert selection_histogram(ids, layout).tolist() == [2, 2, 3]


def test_mode_coverage_is_exact_on_synthetic_factors():
    ds = build_dataset(TINY_DATA, "test")
    data = ds.factors_table  # (N, 4) ground-truth factors
    sizes = ds.factor_sizes
    only_circles = data[data[:, 0] == 0]
    out = mode_coverage(only_circles, data, sizes, ds.factor_names)
    combos = {tuple(r) for r in data.tolist()}
    circle_combos = {c for c in combos if c[0] == 0}
    assert out["modes_total"] == 4 * 6 * 9 * 2
    assert out["modes_in_data"] == len(combos)
    assert out["modes_hit"] == len(circle_combos)
    assert out["mode_coverage"] == pytest.approx(len(circle_combos) / len(combos))
    assert out["per_factor"]["shape"]["modes_hit"] == 1
    assert out["per_factor"]["colour"]["modes_hit"] == len({c[1] for c in circle_combos})
    full = mode_coverage(data, data, sizes)
    assert full["mode_coverage"] == 1.0 and full["js"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ reconstruction


def test_psnr_ssim_known_values():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    # An offset of 0.1 on [-1, 1] is 0.05 on [0, 1]: MSE 0.0025, PSNR 10 log10(1 / 0.0025).
    assert psnr(x, x + 0.1).tolist() == pytest.approx([10 * math.log10(400)] * 3)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3)
    noisy = [ssim(x, x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).mean() for s in (0.05, 0.3)]
    assert 1.0 > noisy[0] > noisy[1]
    torch.testing.assert_close(ssim(x, x + 0.2), ssim(x + 0.2, x))


def test_reconstruction_metrics_are_independent_of_batch_size():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 12, 12, generator=g) * 2 - 1
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    meters = []
    for bs in (3, 10):
        meter = ReconstructionMeter()
        for a, b in zip(x.split(bs), y.split(bs)):
            meter.update(a, b)
        meters.append(meter)
    assert meters[0].summary() == pytest.approx(meters[1].summary())
    assert meters[0].summary()["num_images"] == 10
    assert meters[0].per_image["psnr"].shape == (10,)
