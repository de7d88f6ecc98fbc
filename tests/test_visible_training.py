"""What a run shows while and after it trains: reconstruction grids, every logged curve with the schedule's markers,
the random-LPIPS-trunk warning; and that augmented training resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqgen.core.config import ConfigError, load_config
from vqgen.eval.plots import _panels, plot_stage_curves, plot_training_curves, schedule_markers
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, main, train_tokenizer
from vqgen.tokenizer.data import build_dataset
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.monitor import fixed_batch, recon_due, recon_path, write_recon_grid
from vqgen.tokenizer.perceptual import PerceptualConfig, build_perceptual, random_trunk_warning

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"


def tiny(out: Path, *overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, TINY, [f"output_dir={out}", "train.deterministic=true", *overrides])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


# ---------------------------------------------------------------------------------- reconstruction grids


def test_recon_grids_written_and_training_unchanged(tmp_path, capsys):
    """train.recon_every=2 over 5 steps: grids at steps 2, 4 and 5 (the last), originals above reconstructions;
    the weights are those of the same run without grids, also with a quantizer that draws random numbers in eval
    mode (the adaptive selector's Gumbel noise at eval): the grids leave the global random state alone."""
    common = ["train.steps=5", "schedule.mode=deferred", "schedule.ae_steps=2", "schedule.kmeans_batches=2",
              "model.quantizer.kind=adaptive", "model.quantizer.codebook_size=512", "model.quantizer.capacity=32",
              "model.quantizer.ladder_dims=[8,4,2,1]", "model.quantizer.selector_eval_noise=true"]
    cfg = tiny(tmp_path / "with", *common, "train.recon_every=2")
    train_tokenizer(cfg)
    run = tmp_path / "with"
    assert sorted(p.name for p in (run / "recon").iterdir()) == [
        "step_00000002.png", "step_00000004.png", "step_00000005.png"]
    grid = np.asarray(Image.open(recon_path(run, 4)).convert("RGB"), dtype=np.float64) / 255  # (H, W, 3)
    originals = fixed_batch(build_dataset(cfg.data, "validation"))  # (8, 3, 16, 16) in [-1, 1]
    factor = 64 // 16  # 16-px images are shown 4x (nearest)
    cell = 16 * factor
    assert grid.shape == (2 * cell + 3 * 2, 8 * cell + 9 * 2, 3)
    for i in range(8):
        shown = grid[2:2 + cell:factor, 2 + i * (cell + 2):2 + i * (cell + 2) + cell:factor]  # (16, 16, 3)
        expected = ((originals[i] + 1) / 2).permute(1, 2, 0).numpy()
        assert np.abs(shown - expected).max() <= 1 / 255 + 1e-6
    recon = grid[4 + cell:4 + 2 * cell:factor, 2:2 + cell:factor]
    assert 0 < np.abs(recon - ((originals[0] + 1) / 2).permute(1, 2, 0).numpy()).mean() < 0.5  # a reconstruction
    train_tokenizer(tiny(tmp_path / "without", *common))
    assert not (tmp_path / "without" / "recon").exists()
    a, b = weights(run), weights(tmp_path / "without")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recon_grid_goes_to_tensorboard_only(tmp_path):
    model = VQVAE(ModelConfig(image_size=16, hidden=16, res_hidden=8, num_res_layers=1, downsample=4))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    logged = []
    tensorboard = SimpleNamespace(name="tensorboard", log_images=lambda values, step: logged.append((values, step)))
    other = SimpleNamespace(name="wandb", log_images=lambda values, step: pytest.fail("only TensorBoard takes images"))
    accelerator = SimpleNamespace(is_main_process=True, trackers=[tensorboard, other])
    path = write_recon_grid(model, images, tmp_path, 7, accelerator=accelerator)
    assert path == tmp_path / "recon" / "step_00000007.png" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers
    (values, step), = logged
    assert step == 7 and values["recon"].shape == (1, 3, 2 * 64 + 6, 3 * 64 + 8)
    assert model.training  # the mode is restored
    follower = SimpleNamespace(is_main_process=False, trackers=[tensorboard])
    assert write_recon_grid(model, images, tmp_path / "other", 7, accelerator=follower) is None
    assert [recon_due(s, 3, 7) for s in range(1, 8)] == [False, False, True, False, False, True, True]
    assert not any(recon_due(s, 0, 7) for s in range(1, 8))


def test_recon_every_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="recon_every"):
        tiny(tmp_path, "train.recon_every=-1")


# ------------------------------------------------------------------------------------------- curves


def test_every_logged_curve_gets_a_panel(tmp_path):
    records = [{"step": s, "phase": "quantize", "loss": 1.0 / s, "recon_mse": 0.1 / s, "recon_l1": 0.3,
                "perceptual_loss": 0.2, "gan_g_loss": 0.1, "disc_loss": 0.9, "adaptive_weight": 2.0,
                "logits_real": 0.1, "logits_fake": -0.1, "perplexity": 10.0, "usage": 0.5, "code_distance": 1.0,
                "live_code_distance": 0.9, "lr": 1e-3, "something_new": float(s), "early_stopped": False}
               for s in range(1, 6)]
    records.append({"step": 5, "val_recon_mse": 0.05, "val_nll": 2.0, "best_step": 5})
    panels = {title: keys for title, keys, _ in _panels(records)}
    drawn = [k for keys in panels.values() for k in keys]
    assert sorted(drawn) == sorted({k for r in records for k in r} - {"step", "phase", "early_stopped", "best_step"})
    assert panels["reconstruction (MSE on [0,1]; L1 on [-1,1])"] == ["recon_mse", "recon_l1", "val_recon_mse"]
    assert panels["discriminator logits (mean)"] == ["logits_real", "logits_fake"]
    assert panels["prior validation NLL (nats/token)"] == ["val_nll"]
    assert panels["something new"] == ["something_new"]
    assert plot_training_curves(records, tmp_path / "curves.png").is_file()


def test_quantize_marker_at_ae_steps_not_at_the_first_logged_quantized_step(tmp_path):
    """Deferred with ae_steps=3 and a log every 2 steps: the first quantized record is step 4, the switch is at 3."""
    cfg = tiny(tmp_path, "train.steps=6", "train.log_every=2", "schedule.mode=deferred", "schedule.ae_steps=3",
               "schedule.kmeans_batches=2")
    train_tokenizer(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "quantize"][0] == 4
    import yaml

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert schedule_markers(config) == [(3.0, "quantize")]
    gan = {"schedule": {"mode": "deferred", "ae_steps": 100, "transition_steps": 20},
           "loss": {"disc_weight": 0.5, "disc_start": None}}
    assert schedule_markers(gan) == [(100.0, "GAN on"), (100.0, "quantize"), (120.0, "blend done")]
    assert schedule_markers({"schedule": {"mode": "early"}, "loss": {"disc_weight": 0.5, "disc_start": 50}}) == [
        (50.0, "GAN on")]
    assert schedule_markers({"model": {}, "train": {}}) == []  # a prior's config
    drawn = []
    from matplotlib.axes import Axes

    original = Axes.axvline

    def spy(self, x=0, *args, **kwargs):
        drawn.append(x)
        return original(self, x, *args, **kwargs)

    Axes.axvline = spy
    try:
        assert plot_stage_curves(tmp_path, tmp_path / "curves.png", "tokenizer").is_file()
    finally:
        Axes.axvline = original
    assert drawn and set(drawn) == {3.0}


# ----------------------------------------------------------------------------------- random LPIPS trunk


def test_random_trunk_warned_at_start_and_on_the_model_card(tmp_path, capsys):
    info = build_perceptual(PerceptualConfig(pretrained=False))[1]
    assert "NOT LPIPS" in random_trunk_warning(info)
    assert random_trunk_warning({**info, "is_lpips": True}) is None and random_trunk_warning(None) is None
    main(["--config", str(TINY), "--output-dir", str(tmp_path), "train.steps=2", "loss.perceptual_weight=1.0",
          "loss.perceptual.pretrained=false"])
    err = capsys.readouterr().err
    assert "warning: the perceptual loss uses a randomly initialised VGG16 trunk" in err
    card = (tmp_path / "model" / "README.md").read_text()
    assert "**Warning:** the perceptual loss uses a randomly initialised VGG16 trunk" in card
    assert "from vqgen.tokenizer.model import VQVAE" in card
    main(["--config", str(TINY), "--output-dir", str(tmp_path / "plain"), "train.steps=1"])
    assert "VGG16" not in capsys.readouterr().err
    assert "Warning" not in (tmp_path / "plain" / "model" / "README.md").read_text()


# ------------------------------------------------------------------------------ augmented training resumes


def test_augmented_training_resumes_exactly(tmp_path, monkeypatch):
    """Random crops and flips across epoch ends (3 batches an epoch), stopped mid-epoch and resumed: the weights of
    an uninterrupted run, bit for bit; and not those of the same run without augmentation. The trainer tells the
    training view each epoch (a resumed run starts at its checkpoint's epoch)."""
    from vqgen.tokenizer.data import Augmented

    epochs = []
    original = Augmented.set_augment_epoch
    monkeypatch.setattr(Augmented, "set_augment_epoch",
                        lambda self, epoch: (epochs.append(epoch), original(self, epoch)))
    common = ["data.num_train=24", "train.steps=7", "train.checkpoint_every=2", "data.random_crop=true",
              "data.hflip=true"]
    train_tokenizer(tiny(tmp_path / "full", *common))
    assert epochs == [0, 1, 2]
    assert train_tokenizer(tiny(tmp_path / "part", *common), stop_after=4)["stopped_early"]
    epochs.clear()
    train_tokenizer(tiny(tmp_path / "part", *common))
    assert epochs == [1, 2]
    train_tokenizer(tiny(tmp_path / "plain", *common[:3]))
    full, part, plain = (weights(tmp_path / name) for name in ("full", "part", "plain"))
    assert all(torch.equal(full[k], part[k]) for k in full)
    assert not all(torch.equal(full[k], plain[k]) for k in full)
