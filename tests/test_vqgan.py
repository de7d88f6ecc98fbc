"""VQGAN-style training (issue 11): the loss module, LPIPS offline, the PatchGAN with the adaptive weight, exact
resume and data parallelism with two models and two optimizers, the vqgan architecture, hub-style save/load."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from vqgen.core.config import ConfigError, load_config
from vqgen.tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgen.core.errors import UserError
from vqgen.tokenizer.losses import LossConfig, TokenizerLoss, adaptive_weight, discriminator_loss
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import QuantizerConfig, registered_kinds

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_CONFIGS = REPO / "configs" / "tokenizer"
TINY = TOKENIZER_CONFIGS / "tiny.yaml"
TINY_VQGAN = TOKENIZER_CONFIGS / "tiny_vqgan.yaml"
DATA = Path(__file__).resolve().parent / "data"
# tiny.yaml (16 px) with a 2-layer PatchGAN from step 2 (perceptual off: it is stateless and slow to build)
GAN = ["loss.disc_weight=0.5", "loss.disc_start=2", "loss.disc.num_layers=2", "loss.disc.channels=8"]
GAN_KEYS = {"gan_g_loss", "disc_loss", "adaptive_weight", "logits_real", "logits_fake"}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing


# ------------------------------------------------------------------------------------------------ loss math


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(image_size=16, hidden=8, res_hidden=4, num_res_layers=1,
                              quantizer=QuantizerConfig(kind="vq", codebook_size=8, dim=4)))
    disc = PatchDiscriminator(3, DiscriminatorConfig(num_layers=2, channels=4, norm="none"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = model(x).recon
    last = model.last_layer()
    nll = F.l1_loss(recon, x)
    g_loss = -disc(recon).mean()
    # by hand: the two gradients at the decoder's last weight, their norms, the ratio, the clamp
    (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g_loss, last, retain_graph=True)
    expected = min(max(g_nll.flatten().pow(2).sum().sqrt().item() / (g_adv.flatten().pow(2).sum().sqrt().item() + 1e-4),
                       0.0), 1e4)
    assert adaptive_weight(nll, g_loss, last).item() == pytest.approx(expected, rel=1e-5)
    assert adaptive_weight(nll, g_loss, last, max_weight=1e-3).item() == pytest.approx(min(expected, 1e-3))
    # the loss module uses it, times disc_weight, and keeps the graph for the real backward
    cfg = LossConfig(recon="l1", disc_weight=0.8)
    out = TokenizerLoss(cfg).generator(x, recon, None, logits_fake=disc(recon), last_layer=last)
    assert out.terms["adaptive_weight"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    torch.testing.assert_close(out.loss, nll + 0.8 * expected * g_loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert last.grad is not None


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.5))
    soft = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(soft.item())


def test_default_loss_is_mse_plus_quantizer_loss():
    x, recon, q = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor(0.3)
    out = TokenizerLoss(LossConfig()).generator(x, recon, q)
    assert torch.equal(out.loss, F.mse_loss(recon, x) + q)
    assert set(out.terms) == {"recon_loss", "recon_mse", "quantizer_loss"}


# ------------------------------------------------------------------------------------------------ LPIPS offline


def _fake_vgg16_file(path: Path) -> Path:
    """A torchvision-format VGG16 state dict (random values; the real file is 528 MB and needs a network)."""
    import torchvision

    torch.manual_seed(1)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def test_lpips_trunk_from_a_local_file_and_clear_error_without_one(tmp_path, monkeypatch):
    from vqgen.tokenizer import perceptual
    from vqgen.tokenizer.perceptual import PerceptualConfig, PerceptualWeightsError, build_perceptual

    weights_file = _fake_vgg16_file(tmp_path / "vgg16-397923af.pth")
    net, info = build_perceptual(PerceptualConfig(weights_path=str(weights_file)))
    state = torch.load(weights_file, weights_only=True)
    assert torch.equal(net.net.slice3._modules["10"].weight, state["features.10.weight"])
    assert info["is_lpips"] and info["trunk_sha256"] and info["heads_sha256"]
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    # no file, an empty torch hub cache and no network: one line that says what to do
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(perceptual, "reachable", lambda url, timeout=3.0: False)
    with pytest.raises(PerceptualWeightsError, match="weights_path=.*pretrained=false") as err:
        build_perceptual(PerceptualConfig())
    assert "\n" not in str(err.value)
    # a random trunk is built without touching the global random stream, and says it is not LPIPS
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    _, info = build_perceptual(PerceptualConfig(pretrained=False))
    assert torch.equal(torch.rand(3), before)
    assert info["is_lpips"] is False and "NOT LPIPS" in info["caveat"]


def test_missing_lpips_weights_is_one_line_from_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQGEN_NO_PROGRESS": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY), "--output-dir",
                           str(tmp_path / "run"), "loss.perceptual_weight=1",
                           f"loss.perceptual.weights_path={tmp_path / 'nope.pth'}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: perceptual.weights_path")


# ------------------------------------------------------------------------------------------------ training


def test_tiny_vqgan_trains_with_every_term_logged_and_no_discriminator_in_model(tmp_path):
    cfg = load_config(TokenizerRunConfig, TINY_VQGAN, [f"output_dir={tmp_path}"])
    summary = train_tokenizer(cfg)
    rows = read_metrics(tmp_path)
    start = cfg.loss.disc_start
    for row in rows:
        assert "perceptual_loss" in row
        assert GAN_KEYS <= set(row) if row["step"] > start else not GAN_KEYS & set(row)
    assert all(row["adaptive_weight"] > 0 for row in rows if row["step"] > start)
    # the discriminator is training state: in the checkpoints, never in model/
    saved = weights(tmp_path / "model" / "model.safetensors")
    assert set(saved) == set(VQVAE(cfg.model).state_dict())
    assert not any("disc" in k for k in saved) and sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    checkpoint = next((tmp_path / "checkpoints").iterdir())
    assert (checkpoint / "model_discriminator.safetensors").is_file() and (checkpoint / "optimizer_discriminator.pt").is_file()
    assert any(k.startswith("discriminator.") for k in weights(checkpoint / "model_discriminator.safetensors"))
    assert summary["perceptual"]["is_lpips"] is False and "NOT LPIPS" in summary["perceptual"]["caveat"]
    assert summary["loss"]["disc_start"] == start and summary["discriminator_replica_max_abs_diff"] == 0.0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "disc_weight: 0.5" in card and "psnr" in card


# tiny.yaml switched to each other kind (a field the new kind does not read goes back to its default), and the
# tiny configs of the implicit-codebook and SimVQ kinds as they ship
EVERY_KIND = {
    "vq": (TINY, ["model.quantizer.kind=vq"]),
    "ema": (TINY, []),
    "gumbel": (TINY, ["model.quantizer.kind=gumbel", "model.quantizer.tau_anneal_steps=4"]),
    "adaptive": (TINY, ["model.quantizer.kind=adaptive", "model.quantizer.codebook_size=512",
                        "model.quantizer.capacity=32", "model.quantizer.ladder_dims=[8,4,2,1]"]),
    "fsq": (TOKENIZER_CONFIGS / "tiny_fsq.yaml", []),
    "lfq": (TOKENIZER_CONFIGS / "tiny_lfq.yaml", []),
    "simvq": (TOKENIZER_CONFIGS / "tiny_simvq.yaml", []),
}


def test_every_registered_kind_is_tried_with_the_gan():
    assert set(EVERY_KIND) == set(registered_kinds())


@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
def test_gan_with_every_quantizer(tmp_path, kind):
    config, overrides = EVERY_KIND[kind]
    cfg = load_config(TokenizerRunConfig, config, [f"output_dir={tmp_path}", "train.steps=3", *GAN,
                                                   "loss.disc_start=1", "loss.recon=l1", *overrides])
    assert cfg.model.quantizer.kind == kind
    summary = train_tokenizer(cfg)
    rows = read_metrics(tmp_path)
    assert [bool(GAN_KEYS <= set(r)) for r in rows] == [False, True, True] and "recon_l1" in rows[-1]
    assert all(math.isfinite(r["adaptive_weight"]) for r in rows[1:])
    assert 0 < summary["recon_mse"] < 1


@pytest.mark.parametrize("mode, kind", [("early", "ema"), ("deferred", "ema"), ("deferred", "fsq")])
def test_discriminator_starts_with_quantization_unless_configured(tmp_path, mode, kind):
    """Deferred ema: k-means ends the continuous phase; deferred fsq: an implicit codebook, rounding switched on."""
    config, kind_overrides = EVERY_KIND[kind]
    overrides = [f"output_dir={tmp_path}", "train.steps=5", *[o for o in GAN if "disc_start" not in o], *kind_overrides]
    if mode == "deferred":
        overrides += ["schedule.mode=deferred", "schedule.ae_steps=3", "schedule.kmeans_batches=1"]
    train_tokenizer(load_config(TokenizerRunConfig, config, overrides))
    with_gan = [r["step"] for r in read_metrics(tmp_path) if "disc_loss" in r]
    assert with_gan == ([4, 5] if mode == "deferred" else [1, 2, 3, 4, 5])


def test_gan_needs_images_the_discriminator_can_see(tmp_path):
    with pytest.raises(ConfigError, match="discriminator needs images of at least 24 px"):
        load_config(TokenizerRunConfig, TINY, [f"output_dir={tmp_path}", "loss.disc_weight=0.5"])  # 3 layers, 16 px


def test_kill_9_and_rerun_is_bit_identical_with_the_gan(tmp_path, kill_and_resume):
    """kill -9 mid-run (GAN on, gradient accumulation), the same command again: both models bit-identical."""
    command = [sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY), "train.steps=12",
               "train.checkpoint_every=2", "train.log_every=2", "train.deterministic=true", "train.grad_accum=2",
               "train.batch_size=4", *GAN, "loss.disc_loss=non_saturating"]
    kill_and_resume(command, kill_at="step_00000006")
    assert_identical(weights(tmp_path / "full" / "model" / "model.safetensors"),
                     weights(tmp_path / "part" / "model" / "model.safetensors"))
    last = "checkpoints/step_00000012"
    for name in ("model_discriminator.safetensors", "model_tokenizer.safetensors"):  # the discriminator too
        assert_identical(weights(tmp_path / "full" / last / name), weights(tmp_path / "part" / last / name))
    assert [r["step"] for r in read_metrics(tmp_path / "part")] == [2, 4, 6, 8, 10, 12]


def run_accelerate(args: list[str], port: int, nproc: int, precision: str = "no") -> None:
    env = {**os.environ, "VQGEN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision",
                precision, "--dynamo_backend", "no"]
    if nproc > 1:
        launcher += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(port)]
    else:
        launcher += ["--num_processes", "1"]
    proc = subprocess.run(launcher + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_keep_tokenizer_and_discriminator_replicas_identical(tmp_path):
    """gloo on the CPU: perceptual + GAN with the adaptive weight, gradient accumulation, deferred quantization."""
    run_accelerate(["-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY_VQGAN), "--output-dir", str(tmp_path),
                    "train.steps=5", "train.batch_size=4", "train.grad_accum=2", "train.deterministic=true",
                    "schedule.mode=deferred", "schedule.ae_steps=2", "schedule.kmeans_batches=1",
                    "loss.disc_start=null"], 29571, 2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["loss"]["disc_start"] == 2
    assert summary["replica_max_abs_diff"] == 0.0
    assert summary["discriminator_replica_max_abs_diff"] == 0.0
    rows = read_metrics(tmp_path)
    assert [bool(GAN_KEYS <= set(r)) for r in rows] == [False, False, True, True, True]


def test_gan_under_bf16_mixed_precision(tmp_path):
    run_accelerate(["-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY), "--output-dir", str(tmp_path), *GAN],
                   29572, 1, precision="bf16")
    rows = read_metrics(tmp_path)
    assert all(r["disc_loss"] is not None and r["adaptive_weight"] is not None for r in rows if r["step"] > 2)


# ------------------------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("size, downsample, grid", [(64, 8, 8), (64, 16, 4)])
def test_vqgan_architecture_shapes(size, downsample, grid):
    cfg = ModelConfig(arch="vqgan", image_size=size, hidden=8, num_res_layers=1, downsample=downsample,
                      quantizer=QuantizerConfig(kind="vq", codebook_size=16, dim=4))
    model = VQVAE(cfg)
    assert len(cfg.channel_multipliers) == {8: 4, 16: 5}[downsample]
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = model(x)
    assert out.recon.shape == x.shape and out.quant.indices.shape == (2, grid, grid)
    assert model.last_layer() is model.decoder.conv_out.weight
    assert any(type(m).__name__ == "AttnBlock" for m in model.encoder.modules())


def test_vqgan_config_errors():
    with pytest.raises(ConfigError, match="channel_mult applies to arch=vqgan"):
        load_config(ModelConfig, None, ["channel_mult=[1,2]"])
    with pytest.raises(ConfigError, match="must list 4 positive multipliers"):
        load_config(ModelConfig, None, ["arch=vqgan", "image_size=64", "downsample=8", "channel_mult=[1,2]"])


def test_encode_decode_run_in_bounded_chunks(monkeypatch):
    from vqgen.tokenizer import model as model_module

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(image_size=16, hidden=8, res_hidden=4, num_res_layers=1,
                              quantizer=QuantizerConfig(kind="vq", codebook_size=8, dim=4)))
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    ids, recon = model.encode(x), model.reconstruct(x)
    monkeypatch.setattr(model_module, "INFERENCE_PIXELS", 2 * 16 * 16)  # chunks of 2 images
    assert model._chunks(x)[0].shape[0] == 2
    assert torch.equal(model.encode(x), ids)
    torch.testing.assert_close(model.reconstruct(x), recon)
    torch.testing.assert_close(model.decode(ids), recon)


# ------------------------------------------------------------------------------------------------ sharing


def test_models_saved_before_the_hub_mixin_still_load():
    """tests/data/legacy_* were written by the code before this change (config.json format_version 1)."""
    from vqgen.prior.model import Prior

    tok = VQVAE.from_pretrained(DATA / "legacy_tokenizer")
    io = torch.load(DATA / "legacy_tokenizer_io.pt", weights_only=True)
    assert torch.equal(tok.encode(io["x"]), io["ids"])
    torch.testing.assert_close(tok.reconstruct(io["x"]), io["recon"])
    prior = Prior.from_pretrained(DATA / "legacy_prior", tokenizer_dir=DATA / "legacy_tokenizer")
    assert prior.vocab.vocab_size == 17


def test_hub_mixin_round_trip_with_model_card(tmp_path):
    from huggingface_hub import ModelHubMixin

    from vqgen.prior.model import Prior

    tok = VQVAE.from_pretrained(DATA / "legacy_tokenizer")
    assert isinstance(tok, ModelHubMixin)
    tok.save_pretrained(tmp_path / "tok", model_card_kwargs={"training_config": {"train": {"steps": 7}},
                                                              "summary": {"psnr": 21.5}})
    saved, legacy = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "tok", DATA / "legacy_tokenizer"))
    assert saved["format_version"] == legacy["format_version"] == 1  # the same format, plus the new fields' defaults
    # every field of the old file kept; fields added since (the vqgan preset's, the newer quantizer kinds') at defaults
    new_model = {k: v for k, v in saved["model"].items() if k not in legacy["model"]}
    assert new_model == {"arch": "papers", "channel_mult": None, "attention": True, "activation_checkpointing": False}
    saved_q, legacy_q = saved["model"].pop("quantizer"), legacy["model"].pop("quantizer")
    assert {k: v for k, v in saved["model"].items() if k in legacy["model"]} == legacy["model"]
    # the old flat quantizer section carried every kind's fields; the file written now carries the ema kind's own
    ema_fields = {f.name for f in dataclasses.fields(type(QuantizerConfig(kind="ema")))}
    assert set(saved_q) == ema_fields
    assert {k: v for k, v in legacy_q.items() if k in ema_fields} == {k: saved_q[k] for k in legacy_q if k in ema_fields}
    new_q, defaults = {k: v for k, v in saved_q.items() if k not in legacy_q}, dataclasses.asdict(QuantizerConfig(kind="ema"))
    assert new_q == {k: defaults[k] for k in new_q}
    card = (tmp_path / "tok" / "README.md").read_text()
    assert "library_name: vqgen" in card and "steps: 7" in card and "| `psnr` | 21.5 |" in card
    again = VQVAE.from_pretrained(str(tmp_path / "tok"))
    assert_identical(tok.state_dict(), again.state_dict())
    prior = Prior.from_pretrained(DATA / "legacy_prior")
    prior.save_pretrained(tmp_path / "prior", model_card_kwargs={"summary": {"val_nll": 2.0}})
    assert "val_nll" in (tmp_path / "prior" / "README.md").read_text()
    assert_identical(prior.state_dict(), Prior.from_pretrained(tmp_path / "prior").state_dict())


def test_from_pretrained_hub_id_without_network_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="neither a local folder nor a tokenizer") as err:
        VQVAE.from_pretrained("someone/no-such-tokenizer")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a saved tokenizer"):
        VQVAE.from_pretrained(tmp_path / "missing" / "model")


def test_imagenet256_config_runs_on_synthetic_data(tmp_path):
    """The smoke run of configs/tokenizer/imagenet256_vqgan.yaml (synthetic data, 2 steps of 2 images), at a
    narrower width so that it takes about a minute (the full width takes about 7 minutes on this CPU; README)."""
    cfg = load_config(TokenizerRunConfig, REPO / "configs" / "tokenizer" / "imagenet256_vqgan.yaml",
                      [f"output_dir={tmp_path}", "data.source=synthetic", "data.data_dir=null", "train.steps=2",
                       "train.batch_size=2", "loss.perceptual.pretrained=false", "model.hidden=8", "train.num_workers=0"])
    assert (cfg.model.image_size, cfg.model.grid, cfg.model.quantizer.codebook_size) == (256, (16, 16), 16384)
    summary = train_tokenizer(cfg)
    assert summary["steps"] == 2 and "perceptual_loss" in read_metrics(tmp_path)[-1]
    with pytest.raises(ConfigError, match="data.data_dir is set but data.source='synthetic' ignores it"):
        load_config(TokenizerRunConfig, REPO / "configs" / "tokenizer" / "imagenet256_vqgan.yaml",
                    [f"output_dir={tmp_path}", "data.source=synthetic"])  # the folder must be unset explicitly
