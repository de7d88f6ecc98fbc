"""The VQ-VAE: shapes for each preset, save/load round trip, token API, clear errors."""

import pytest
import torch

from vqgen.core.config import ConfigError, from_dict
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import QuantizerConfig

KINDS = {
    "vq": QuantizerConfig(kind="vq", codebook_size=16, dim=8),
    "ema": QuantizerConfig(kind="ema", codebook_size=16, dim=8),
    "gumbel": QuantizerConfig(kind="gumbel", codebook_size=16, dim=8),
    "adaptive": QuantizerConfig(kind="adaptive", dim=8, capacity=16, ladder_dims=[4, 2, 1], selector_heads=2),
    "fsq": QuantizerConfig(kind="fsq", dim=3, levels=[5, 4, 3]),
    "lfq": QuantizerConfig(kind="lfq", dim=4, codebook_size=16),
    "simvq": QuantizerConfig(kind="simvq", codebook_size=16, dim=8),
    "vq-rotation": QuantizerConfig(kind="vq", codebook_size=16, dim=8, rotation_trick=True),
}


def tiny(kind="ema", downsample=4, size=16, channels=3) -> VQVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=size, in_channels=channels, hidden=16, res_hidden=8, num_res_layers=1,
                      downsample=downsample, quantizer=KINDS[kind])
    return VQVAE(cfg)


def test_paper_preset_is_32_to_8x8():
    cfg = ModelConfig()
    assert (cfg.hidden, cfg.res_hidden, cfg.num_res_layers, cfg.grid) == (128, 32, 2, (8, 8))
    model = VQVAE(cfg)
    assert model.encode_latents(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8, 64)


@pytest.mark.parametrize("downsample, grid", [(2, 8), (4, 4), (8, 2)])
def test_downsampling(downsample, grid):
    model = tiny(downsample=downsample)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.recon.shape == x.shape and out.quant.indices.shape == (3, grid, grid)
    assert model.encode(x).shape == (3, grid, grid)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_and_token_api(tmp_path, kind):
    model = tiny(kind, channels=1)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    model.train()
    model(x)  # one training forward: EMA statistics, temperature counters move
    model.save_pretrained(tmp_path / "tok")
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = loaded.encode(x)
    assert torch.equal(ids, model.encode(x))
    assert ids.dtype == torch.int64 and int(ids.max()) < loaded.quantizer.codebook_size
    images = loaded.decode(ids)
    assert images.shape == x.shape
    torch.testing.assert_close(images, loaded.reconstruct(x))  # decode(encode(x)) is the eval reconstruction
    layout = loaded.layout()
    assert layout.grid == (4, 4) and layout.num_codes == loaded.quantizer.codebook_size
    assert layout.kind == KINDS[kind].kind and layout.per_image_codebook == (kind == "adaptive")
    assert type(layout).from_dict(layout.to_dict()) == layout
    assert model.training  # encode/decode leave the caller's mode alone


def test_errors_are_clear(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.decode(torch.full((1, 4, 4), 99))
    with pytest.raises(FileNotFoundError, match="not a saved tokenizer"):
        VQVAE.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not divisible by downsample"):
        from_dict(ModelConfig, {"image_size": 20, "downsample": 8})
    with pytest.raises(ConfigError, match="power of two"):
        from_dict(ModelConfig, {"downsample": 3})


def test_a_tokenizer_saved_with_a_field_its_kind_ignored_still_loads(tmp_path):
    """Saved before unread fields were refused: an adaptive tokenizer whose config.json sets codebook_size."""
    import json

    model = tiny("adaptive")
    model.save_pretrained(tmp_path / "tok")
    path = tmp_path / "tok" / "config.json"
    meta = json.loads(path.read_text())
    meta["model"]["quantizer"]["codebook_size"] = 16  # what switching kind on top of tiny.yaml used to save
    path.write_text(json.dumps(meta))
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    assert loaded.quantizer.codebook_sizes == model.quantizer.codebook_sizes
    with pytest.raises(ConfigError, match="codebook_size=16 is not an option of kind 'adaptive'"):
        from_dict(ModelConfig, meta["model"])  # a config written today is refused
