"""The VQ-VAE: convolutional encoder/decoder around any quantizer of ``tokenizer.quantizers``.

The default preset is the papers' network (van den Oord et al.; also the adaptive-quantization authors'):
two stride-2 convolutions and a residual stack with 128 hidden and 32 residual-hidden channels and two
residual layers, so 32x32 images become 8x8 latents. Width, depth and downsampling are configurable.

Saved as ``config.json`` + ``model.safetensors`` by ``save_pretrained``; ``from_pretrained`` rebuilds the
model from those two files alone.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, from_dict, to_dict
from .errors import CorruptFileError, MissingFileError
from .io import atomic_path, file_fingerprint, load_json, load_safetensors
from .layout import CodebookLayout
from .quantizers import Quantizer, QuantizerConfig, QuantizerOutput, build_quantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Architecture of the VQ-VAE. ``quantizer.dim`` is the latent width the quantizer sees."""

    image_size: int = 32
    in_channels: int = 3
    hidden: int = 128
    res_hidden: int = 32
    num_res_layers: int = 2
    downsample: int = 4  # 2**k with k stride-2 convolutions; 4: 32x32 -> 8x8
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def validate(self) -> None:
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2 (e.g. 4 or 8), got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by downsample {self.downsample}; "
                "change data.image_size or model.downsample"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {self.in_channels}")
        if self.hidden < 2 or self.hidden % 2 or self.res_hidden < 1 or self.num_res_layers < 0:
            raise ValueError("hidden must be an even number >= 2, res_hidden >= 1, num_res_layers >= 0")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side


@dataclass
class VQVAEOutput:
    """What one forward pass returns. ``quant`` is None in the continuous (unquantized) phase."""

    recon: torch.Tensor  # (B, C, H, W)
    loss: torch.Tensor  # scalar: recon_loss + quantizer loss
    recon_loss: torch.Tensor  # scalar: MSE on the [-1, 1] scale
    quant: QuantizerOutput | None
    z_e: torch.Tensor  # (B, h, w, D) encoder output before quantization


class ResidualStack(nn.Module):
    """``num_layers`` x (ReLU, 3x3 conv C->R, ReLU, 1x1 conv R->C, add), then ReLU."""

    def __init__(self, channels: int, res_hidden: int, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_hidden, channels, 1),
            )
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """(B, C_in, H, W) -> (B, hidden, H/s, W/s) with log2(s) stride-2 4x4 convolutions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_down = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = []
        channels = cfg.in_channels
        for i in range(n_down):
            out = cfg.hidden // 2 if i < n_down - 1 else cfg.hidden
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, cfg.hidden, 3, padding=1))
        self.net = nn.Sequential(*layers, ResidualStack(cfg.hidden, cfg.res_hidden, cfg.num_res_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, hidden, h, w) -> (B, C_in, H, W), mirror of the encoder with transposed convolutions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_up = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1),
            ResidualStack(cfg.hidden, cfg.res_hidden, cfg.num_res_layers),
        ]
        channels = cfg.hidden
        for i in range(n_up):
            last = i == n_up - 1
            out = cfg.in_channels if last else cfg.hidden // 2
            layers.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            channels = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily put ``module`` in eval mode (no EMA updates, no Gumbel noise), then restore."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class VQVAE(nn.Module):
    """Encoder -> 1x1 conv to ``quantizer.dim`` -> quantizer -> 1x1 conv back -> decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.quantizer: Quantizer = build_quantizer(cfg.quantizer)
        dim = self.quantizer.dim
        self.encoder = Encoder(cfg)
        self.pre_quant = nn.Conv2d(cfg.hidden, dim, 1)
        self.post_quant = nn.Conv2d(dim, cfg.hidden, 1)
        self.decoder = Decoder(cfg)

    # ---------------------------------------------------------------- shapes and checks
    def _check_images(self, x: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"the tokenizer expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}; set data.image_size / data.channels to match the tokenizer"
            )

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output, channel-last: (B, C, H, W) -> (B, h, w, D)."""
        self._check_images(x)
        return self.pre_quant(self.encoder(x)).permute(0, 2, 3, 1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> images (B, C, H, W), not clamped."""
        return self.decoder(self.post_quant(z.permute(0, 3, 1, 2)))

    # ---------------------------------------------------------------- training forward
    def forward(self, x: torch.Tensor, quantize: bool = True, alpha: float = 0.0) -> VQVAEOutput:
        """Reconstruct ``x`` (B, C, H, W) in [-1, 1].

        ``quantize=False`` is the continuous autoencoder of deferred quantization's first phase: the decoder
        gets ``quantizer.continuous(z_e)`` (``z_e`` itself for codebook quantizers; bounded for ``fsq``,
        squashed for ``lfq``). ``alpha`` in [0, 1] blends ``alpha * continuous(z_e) + (1 - alpha) * z_q`` (the
        optional soft transition).
        """
        z_e = self.encode_latents(x)  # (B, h, w, D)
        quant = None
        if quantize:
            quant = self.quantizer(z_e)
            z = quant.quantized
            if alpha > 0.0:
                z = alpha * self.quantizer.continuous(z_e) + (1.0 - alpha) * z
        else:
            z = self.quantizer.continuous(z_e)
        recon = self.decode_latents(z)
        recon_loss = F.mse_loss(recon, x)
        loss = recon_loss + quant.loss if quant is not None else recon_loss
        return VQVAEOutput(recon=recon, loss=loss, recon_loss=recon_loss, quant=quant, z_e=z_e)

    # ---------------------------------------------------------------- public token API
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> token ids (B, h, w) int64 (joint ids for ``adaptive``)."""
        with _eval_mode(self):
            return self.quantizer(self.encode_latents(images)).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> images (B, C, H, W) (not clamped)."""
        h, w = self.config.grid
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (h, w):
            raise ValueError(f"expected token ids of shape (B, {h}, {w}), got {tuple(indices.shape)}")
        vocab = self.quantizer.codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got values outside that range")
        with _eval_mode(self):
            return self.decode_latents(self.quantizer.lookup(indices))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode then decode (eval mode), (B, C, H, W) -> (B, C, H, W)."""
        with _eval_mode(self):
            return self.forward(images).recon

    def layout(self) -> CodebookLayout:
        """The token layout a prior and the reports need: codebook sizes and offsets, grid, codebook choice."""
        q = self.quantizer
        return CodebookLayout(
            codebook_sizes=tuple(q.codebook_sizes),
            grid=self.config.grid,
            per_image_codebook=q.per_image_codebook,
            kind=q.spec.name,
            image_size=self.config.image_size,
            channels=self.config.in_channels,
        )

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (atomically, as a whole)."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory) as tmp:
            tmp.mkdir(parents=True)
            meta = {"format_version": FORMAT_VERSION, "model": to_dict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "VQVAE":
        """Rebuild a saved tokenizer from its directory alone (no training code involved)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise MissingFileError(
                f"{directory} is not a saved tokenizer: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(the model/ folder that pipelines.train_tokenizer writes)"
            )
        meta = load_json(config_path)
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "model" not in meta:
            raise ConfigError(f"{config_path} was not written by this version of vqgen's save_pretrained")
        saved = dict(meta["model"])
        if isinstance(saved.get("quantizer"), dict):  # fields the kind ignored (older files may set them)
            saved["quantizer"] = QuantizerConfig.drop_unread(saved["quantizer"])
        model = cls(from_dict(ModelConfig, saved))
        # load on the CPU first: safetensors rejects device strings such as "cpu:0" that Accelerate may hand out
        state = load_safetensors(weights_path, device="cpu")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise CorruptFileError(weights_path, f"its tensors do not fit {config_path}: {detail}") from None
        return model.to(map_location).eval()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a saved tokenizer's weights: identifies exactly which tokenizer produced some tokens."""
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError(f"no tokenizer weights at {path}")
    return file_fingerprint(path)

