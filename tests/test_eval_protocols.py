"""Protocols, references and scoring images from anywhere: streamed FID statistics against torch-fidelity's,
ADM-style .npz batches (written here), the reference cache, DINOv2 through a tiny random Dinov2Model saved to
tmp_path, and ``evaluate --images`` / ``--tokenizer --samples``. Nothing downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import linalg
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from vqgen.core.config import to_dict
from vqgen.core.errors import UserError
from vqgen.eval.fid import (
    INCEPTION_NAME,
    FeatureSpace,
    RunningStatistics,
    fid_from_features,
    fid_from_statistics,
    fid_statistics,
    images_to_uint8,
    load_feature_space,
)
from vqgen.eval.image_sets import NpzBatch, pack_folder, write_npz_batch
from vqgen.eval.streaming import stream_features
from vqgen.pipelines.evaluate import main
from vqgen.pipelines.score import Reference, reference_tensors
from vqgen.tokenizer.data import DataConfig, build_dataset

from test_eval_report import FAST, make_run

TINY_DATA = DataConfig(image_size=16, num_train=192, num_validation=32, num_test=48)
SMALL = ["batch_size=16", "kid_subsets=5", "kid_subset_size=10", "k=3", "device=cpu", "classifier.width=8",
         "classifier.feature_dim=16", "classifier.max_steps=20", "classifier.batch_size=32"]

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer DINOv2 (width 32, patch 14), saved as safetensors like the hub's."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=224, patch_size=14)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _test_split_uint8(n: int | None = None) -> torch.Tensor:
    ds = build_dataset(TINY_DATA, "test")
    return images_to_uint8(torch.stack([ds[i]["image"] for i in range(n or len(ds))]))  # (N, 3, 16, 16)


def _write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return folder


# ------------------------------------------------------------------------------------------------ the formula


def test_streamed_fid_on_fixed_features_equals_torch_fidelity():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 12, generator=g, dtype=torch.float64) * 3 + 50  # large offsets: a cancellation trap
    b = torch.randn(257, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    stats_a, stats_b = RunningStatistics(), RunningStatistics()
    for chunk in a.split(7):
        stats_a.update(chunk)
    for chunk in b.split(100):
        stats_b.update(chunk)
    ours = fid_from_statistics(stats_a.statistics(), stats_b.statistics())

    theirs_a, theirs_b = fid_features_to_statistics(a), fid_features_to_statistics(b)
    np.testing.assert_allclose(stats_a.statistics()["mu"], theirs_a["mu"], rtol=1e-12)
    np.testing.assert_allclose(stats_a.statistics()["sigma"], theirs_a["sigma"], rtol=1e-9, atol=1e-9)
    theirs = fid_statistics_to_metric(theirs_a, theirs_b, verbose=False)[KEY_METRIC_FID]
    assert ours == pytest.approx(theirs, rel=1e-9)
    # the formula itself: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
    mu_a, mu_b, s_a, s_b = theirs_a["mu"], theirs_b["mu"], theirs_a["sigma"], theirs_b["sigma"]
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert ours == pytest.approx(direct, rel=1e-8)
    assert fid_from_features(a, b) == pytest.approx(ours, rel=1e-9)


# ------------------------------------------------------------------------------------------------ .npz batches


def test_npz_batches_round_trip_in_batches(tmp_path):
    images = _test_split_uint8(23)
    path = write_npz_batch(images.split(5), 23, tmp_path / "samples.npz")
    with np.load(path, allow_pickle=False) as data:
        assert list(data) == ["arr_0"] and data["arr_0"].dtype == np.uint8
        assert data["arr_0"].shape == (23, 16, 16, 3)  # N x H x W x 3, as ADM's evaluator reads it
        assert np.array_equal(data["arr_0"], images.permute(0, 2, 3, 1).numpy())
    batch = NpzBatch.open(path)
    assert batch.num_images == 23 and batch.statistics() is None
    assert torch.equal(torch.cat(list(batch.iter_images(4, limit=10))), images[:10])
    # a compressed reference batch (as ADM publishes them) streams the same way
    np.savez_compressed(tmp_path / "ref.npz", arr_0=images.permute(0, 2, 3, 1).numpy(), mu=np.zeros(3),
                        sigma=np.eye(3))
    ref = NpzBatch.open(tmp_path / "ref.npz")
    assert torch.equal(torch.cat(list(ref.iter_images(6))), images)
    assert ref.statistics(3)["sigma"].shape == (3, 3)
    with pytest.raises(ValueError, match="another feature space"):
        ref.statistics(2048)
    # a samples folder (PNGs under images/) packs into the same file
    packed = pack_folder(_write_pngs(images, tmp_path / "run_samples" / "images").parent, tmp_path / "packed.npz")
    assert np.array_equal(np.load(packed)["arr_0"], images.permute(0, 2, 3, 1).numpy())


def test_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="Python objects"):
        NpzBatch.open(tmp_path / "evil.npz")


def _space(name: str, tiny_dinov2: Path | None = None) -> FeatureSpace:
    if name == "dinov2":
        return load_feature_space("dinov2", weights_path=str(tiny_dinov2))
    from vqgen.eval.features import ClassifierConfig

    return load_feature_space("offline", data_cfg=TINY_DATA, classifier=ClassifierConfig(
        width=8, feature_dim=16, max_steps=20, batch_size=32))


def test_adm_reference_statistics_are_used_and_cached(tmp_path):
    """An .npz holding mu/sigma (ADM's reference batch layout) is scored against its statistics; its arr_0
    images serve KID / k-NN only. The Inception branch is taken by a stand-in extractor (real Inception
    weights are not on this machine): a space registered under inception-v3-compat's name."""
    offline = _space("offline")
    stand_in = FeatureSpace("inception", INCEPTION_NAME, offline.extractor, offline.weights_path, "1" * 64,
                            info={"weights_known": True})
    images = _test_split_uint8()
    feats = stand_in.extract(images)["features"]
    stats = fid_statistics(feats[:30])
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=images[30:].permute(0, 2, 3, 1).numpy(), mu=stats["mu"], sigma=stats["sigma"],
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    ref = Reference(npz=NpzBatch.open(path), text=str(path))
    tensors, hit, described = reference_tensors(stand_in, ref, keep=10, batch_size=8)
    assert not hit and described["statistics"].startswith("the file's mu / sigma")
    np.testing.assert_allclose(tensors["mu"].numpy(), stats["mu"])
    assert tensors["features"].shape == (10, feats.shape[1])  # the first 10 of arr_0 for the k-NN metrics
    torch.testing.assert_close(tensors["features"], feats[30:40], rtol=1e-5, atol=1e-5)  # float32 features
    assert described["sha256"] == NpzBatch.open(path).sha256
    again, hit, _ = reference_tensors(stand_in, ref, keep=10, batch_size=8)
    assert hit and torch.equal(again["sigma"], tensors["sigma"])
    # another extractor ignores the Inception statistics and uses the images (a different cache entry)
    other, hit, described = reference_tensors(offline, ref, keep=10, batch_size=8)
    assert not hit and "arr_0 images" in described["statistics"] and "note" in described
    np.testing.assert_allclose(other["mu"].numpy(), fid_statistics(feats[30:])["mu"], rtol=1e-5, atol=1e-6)
    # raw activations (N, F) stand for the images
    np.savez(tmp_path / "acts.npz", activations=feats.numpy())
    acts, _, described = reference_tensors(offline, Reference(npz=NpzBatch.open(tmp_path / "acts.npz")), 10, 8)
    np.testing.assert_allclose(acts["sigma"].numpy(), fid_statistics(feats)["sigma"], rtol=1e-9, atol=1e-12)
    assert "activations" in described["statistics"]


def test_images_against_an_npz_reference_and_the_cache(tmp_path, tiny_dinov2):
    images = _test_split_uint8()
    folder = _write_pngs(images[:24], tmp_path / "theirs")
    ref_path = write_npz_batch([images[24:]], 24, tmp_path / "reference.npz")
    args = ["--images", str(folder), "--reference", str(ref_path), "--extractor", "dinov2", "--dinov2-weights",
            str(tiny_dinov2), "extra_extractors=[]", *SMALL]
    report = main([*args, "--output", str(tmp_path / "out")])
    space = load_feature_space("dinov2", weights_path=str(tiny_dinov2))
    expected = fid_from_features(space.extract(images[:24])["features"], space.extract(images[24:])["features"])
    assert report["generation"]["fid"] == pytest.approx(expected, rel=1e-5)
    assert report["generation"]["num_samples"] == 24
    assert report["reference"]["kind"] == "npz" and report["reference"]["sha256"] == NpzBatch.open(ref_path).sha256
    assert report["reference"]["extractor_sha256"] == space.weights_sha256 and not report["reference"]["cache_hit"]
    assert report["feature_extractor"]["weights_known"] is False  # a random model, not the published ViT-L/14
    codes = {c["code"] for c in report["caveats"]}
    assert {"handful", "unknown_weights"} <= codes
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="caveats"' in html and "<table>" in html and "report_files/grid.png" in html
    again = main([*args, "--output", str(tmp_path / "out2")])
    assert again["reference"]["cache_hit"] and again["generation"]["fid"] == pytest.approx(expected, rel=1e-5)
    # the same images as reference: FID ~ 0 (an npz of samples is scored like a folder)
    same = main(["--images", str(ref_path), "--reference", str(ref_path), "--extractor", "dinov2", "--dinov2-weights",
                 str(tiny_dinov2), "extra_extractors=[]", *SMALL, "--output", str(tmp_path / "same")])
    assert abs(same["generation"]["fid"]) < 1e-3


def test_images_against_a_data_set(tmp_path):
    """A folder of images scored against a data set described by a YAML file (offline classifier); the
    same images give FID ~ 0, and 48 images are flagged as a handful."""
    images = _test_split_uint8()
    folder = _write_pngs(images, tmp_path / "samples" / "images").parent  # a samples folder, PNGs in images/
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": to_dict(TINY_DATA)}))
    report = main(["--images", str(folder), "--reference", str(tmp_path / "data.yaml"), "reference_split=test",
                   *SMALL, "--output", str(tmp_path / "out")])
    assert abs(report["generation"]["fid"]) < 1e-3 and report["generation"]["num_samples"] == 48
    assert report["reference"]["kind"] == "data set" and report["reference"]["split"] == "test"
    assert report["reference"]["num_images"] == 48
    assert any(c["code"] == "handful" for c in report["caveats"])


def test_stage_wise_folders_and_progress(tmp_path, capsys, monkeypatch):
    """``--tokenizer runs/tok --samples runs/samples``, the folders the README's stage-wise commands write."""
    monkeypatch.delenv("VQGEN_NO_PROGRESS", raising=False)
    run = make_run(tmp_path / "build")
    tok, samples = tmp_path / "runs" / "tok", tmp_path / "runs" / "samples"
    tok.parent.mkdir()
    (run / "tokenizer").rename(tok)
    (run / "samples").rename(samples)
    report = main(["--tokenizer", str(tok), "--samples", str(samples), "--output", str(tmp_path / "runs" / "eval"),
                   *FAST, "extra_extractors=[]"])
    assert report["generation"]["fid"] is not None and report["tokenizer"]["rfid"] is not None
    assert (tmp_path / "runs" / "eval" / "report_files" / "tokenizer_curves.png").is_file()
    err = capsys.readouterr().err
    assert "reconstruct the test split" in err and "offline features: samples" in err
    alone = main(["--tokenizer", str(tok), "--output", str(tmp_path / "runs" / "eval_tok"), *FAST, "extra_extractors=[]"])
    assert alone["generation"]["fid"] is None and any("--samples" in n for n in alone["notes"])


def test_protocol_on_a_run_with_dinov2(tmp_path, tiny_dinov2, capsys):
    run = make_run(tmp_path / "run")
    (run / "tokenizer" / "config.yaml").write_text(yaml.safe_dump({"data": to_dict(TINY_DATA)}))
    common = ["--run", str(run), "--protocol", "fd-dinov2", "--dinov2-weights", str(tiny_dinov2),
              "batch_size=16", "kid_subsets=5", "kid_subset_size=10", "k=3", "device=cpu"]
    with pytest.raises(SystemExit) as exc:  # a protocol wants the published weights
        main(common)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow_unknown_weights" in err[0]
    report = main([*common, "allow_unknown_weights=true"])
    assert report["protocol"]["name"] == "fd-dinov2" and report["protocol"]["num_samples"] == 50_000
    assert report["protocol"]["num_samples_scored"] == 24
    assert report["tokenizer"]["split"] == "validation" and report["tokenizer"]["num_images"] == 32
    assert report["reference"]["split"] == "train" and report["reference"]["num_images"] == 192
    assert report["feature_extractor"]["torch_fidelity_name"] == "vqgen-dinov2"
    assert report["feature_extractor"]["feature_dim"] == 32
    codes = [c["code"] for c in report["caveats"]]
    assert codes[0] == "protocol_count" and "unknown_weights" in codes
    assert "## caveats" in (run / "report.md").read_text()
    with pytest.raises(SystemExit):  # a protocol fixes the counts
        main([*common, "num_images=100"])
    assert "protocol=fd-dinov2 fixes" in capsys.readouterr().err


def test_sample_writes_an_adm_npz(tiny_run, tmp_path):
    """``sample --npz``: the PNGs once more as one ADM sample batch, arr_0 uint8 (N, H, W, 3), in index order;
    the batch scores like the folder it came from."""
    from vqgen.pipelines.sample import main as sample_main

    out = tmp_path / "samples"
    meta = sample_main(["--prior", str(tiny_run / "prior" / "model"), "--output-dir", str(out), "--num-samples", "6",
                        "--batch-size", "4", "--npz"])
    assert meta["npz"] == "samples.npz"
    with np.load(out / "samples.npz", allow_pickle=False) as data:
        arr = data["arr_0"]
    pngs = sorted((out / "images").glob("*.png"))
    assert arr.dtype == np.uint8 and arr.shape[0] == 6 == len(pngs) and arr.shape[-1] == 3
    for i, png in enumerate(pngs):
        assert np.array_equal(arr[i], np.asarray(Image.open(png).convert("RGB")))
