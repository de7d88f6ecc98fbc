"""Weight files of the published extractors: checked against their sha256 before anything parses them, parsed
with torch.load(weights_only=True) or safetensors, and every failure is one line. A pickle planted as the
cached Inception weights never runs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vqgen.core.config import to_dict
from vqgen.eval import dinov2 as dinov2_module
from vqgen.eval import fid as fid_module
from vqgen.eval.fid import FeatureExtractorError, inception_extractor, load_feature_space
from vqgen.eval.weights import INCEPTION, WeightsError, load_torch_state_dict, read_verified, sha256_bytes
from vqgen.pipelines.evaluate import main
from vqgen.tokenizer.data import DataConfig

TINY_DATA = DataConfig(image_size=16, num_train=64, num_validation=0, num_test=16)


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path: Path, marker: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path.read_bytes()


def _images_and_reference(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    ref = tmp_path / "data.yaml"
    ref.write_text(yaml.safe_dump({"data": to_dict(TINY_DATA)}))
    return folder, ref


def test_planted_inception_pickle_never_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION.filename
    marker = tmp_path / "payload_ran"
    _plant(cached, marker)
    # the file is a live payload: an unsafe load of a copy runs it
    control = tmp_path / "control_ran"
    _plant(tmp_path / "control.pth", control)
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()

    folder, ref = _images_and_reference(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--images", str(folder), "--reference", str(ref), "--extractor", "inception", "extra_extractors=[]",
              "reference_split=test", "device=cpu", "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert INCEPTION.sha256 in err[0] and str(cached) in err[0] and INCEPTION.source in err[0]
    assert not marker.exists()


def test_weights_only_refuses_a_payload_even_with_a_matching_sha256(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    path = tmp_path / INCEPTION.filename
    data = _plant(path, marker)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_torch_state_dict(data, path)
    # pretend the planted file were the published one: the second layer still refuses it
    monkeypatch.setattr(fid_module, "INCEPTION", dataclasses.replace(INCEPTION, sha256=sha256_bytes(data)))
    with pytest.raises(WeightsError, match="weights_only=True") as err:
        inception_extractor(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_missing_and_wrong_inception_files_are_one_line(tmp_path, capsys):
    folder, ref = _images_and_reference(tmp_path)
    missing = tmp_path / "nowhere" / INCEPTION.filename
    base = ["--images", str(folder), "--reference", str(ref), "--extractor", "inception", "extra_extractors=[]",
            "reference_split=test", "device=cpu", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main([*base, "--inception-weights", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and INCEPTION.source in err[0] and "--inception-weights" in err[0]
    other = tmp_path / "other.pth"
    torch.save({"w": torch.ones(3)}, other)
    with pytest.raises(SystemExit):
        main([*base, "--inception-weights", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and sha256_bytes(other.read_bytes()) in err[0] and INCEPTION.sha256 in err[0]
    with pytest.raises(FeatureExtractorError, match="does not exist"):
        load_feature_space("inception", weights_path=str(missing))


def test_a_verified_inception_file_builds_torch_fidelitys_extractor(tmp_path, monkeypatch):
    """A tensor-only file whose sha256 is the known one (here: random weights, the known digest patched to
    theirs) is parsed with weights_only=True and becomes torch-fidelity's inception-v3-compat."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:  # build the architecture without weights, to save random ones
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        torch.manual_seed(0)
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    path = tmp_path / INCEPTION.filename
    torch.save(random_net.state_dict(), path)
    digest = sha256_bytes(path.read_bytes())
    monkeypatch.setattr(fid_module, "INCEPTION", dataclasses.replace(INCEPTION, sha256=digest))
    space = load_feature_space("inception", weights_path=str(path))
    assert space.weights_sha256 == digest and space.info["weights_known"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = space.extract(images)["features"]
    assert features.shape == (2, 2048)
    expected = random_net(images)[0].double()  # the same network with the weights loaded unsafely by hand
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ DINOv2


def _save_tiny_dinov2(folder: Path, **overrides) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=224, patch_size=14)
    Dinov2Model(Dinov2Config(**{**settings, **overrides})).save_pretrained(folder, safe_serialization=True)
    return folder


def test_dinov2_weights_checks(tmp_path, monkeypatch):
    folder = _save_tiny_dinov2(tmp_path / "tiny")
    space = load_feature_space("dinov2", weights_path=str(folder))
    assert not space.info["weights_known"] and "not the published" in space.info["note"]
    features = space.extract(torch.zeros(3, 3, 64, 64, dtype=torch.uint8))["features"]
    assert features.shape == (3, 32)

    data = (folder / "model.safetensors").read_bytes()
    monkeypatch.setattr(dinov2_module, "DINOV2_VITL14",
                        dataclasses.replace(dinov2_module.DINOV2_VITL14, sha256=sha256_bytes(data)))
    assert load_feature_space("dinov2", weights_path=str(folder / "model.safetensors")).info["weights_known"]
    monkeypatch.undo()

    with pytest.raises(WeightsError, match="does not unpickle"):  # only safetensors
        load_feature_space("dinov2", weights_path=str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(WeightsError, match="not found") as err:
        load_feature_space("dinov2", weights_path=str(tmp_path / "missing" / "model.safetensors"))
    assert "facebook/dinov2-large" in str(err.value) and "\n" not in str(err.value)
    # a ViT-L/14 that is not the published file is refused before its weights are parsed
    vitl = tmp_path / "vitl"
    vitl.mkdir()
    (vitl / "model.safetensors").write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (vitl / "config.json").write_text(json.dumps({**config, "hidden_size": 1024, "num_hidden_layers": 24}))
    with pytest.raises(WeightsError, match="ViT-L/14 but not the published file"):
        load_feature_space("dinov2", weights_path=str(vitl))


def test_read_verified_names_both_digests(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    assert read_verified(path)[1] == sha256_bytes(b"abc")
    with pytest.raises(WeightsError, match=f"its sha256 is {sha256_bytes(b'abc')}, expected {'0' * 64}"):
        read_verified(path, expected_sha256="0" * 64)
