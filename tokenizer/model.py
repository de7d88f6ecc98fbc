"""The VQ-VAE: convolutional encoder/decoder around any quantizer of ``tokenizer.quantizers``.

Two architecture presets (``ModelConfig.arch``):

- ``papers`` (default): the papers' network (van den Oord et al.; also the adaptive-quantization authors'):
  stride-2 convolutions and a residual stack with 128 hidden and 32 residual-hidden channels and two
  residual layers, so 32x32 images become 8x8 latents. Width, depth and downsampling are configurable.
- ``vqgan``: the taming / LlamaGen VQ-16 encoder and decoder for real resolutions: ResNet blocks with
  GroupNorm and SiLU at widths ``hidden * channel_mult[i]``, one stride-2 convolution per level (nearest
  upsampling + conv in the decoder), self-attention at the lowest resolution and in the middle block.
  ``downsample`` 8 or 16 (``channel_mult`` of length 4 or 5) turns 256x256 images into 32x32 or 16x16 tokens.

``forward`` returns the reconstruction and the quantizer output; the training objective (reconstruction,
quantizer, perceptual and adversarial terms) is composed by ``tokenizer.losses``.

Saved as ``config.json`` + ``model.safetensors`` (+ a generated model card ``README.md``) by
``save_pretrained`` (``huggingface_hub``'s ``ModelHubMixin``, which also gives ``push_to_hub``);
``from_pretrained`` rebuilds the model from a local folder or a hub id from those files alone.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from huggingface_hub import ModelHubMixin
from safetensors.torch import save_file
from torch import nn

from vqgen.core.config import ConfigError, from_dict, to_dict
from vqgen.core.errors import CorruptFileError, MissingFileError
from vqgen.core.hub import CARD_TEMPLATE, LIBRARY_NAME, card_kwargs, hub_folder, is_hub_id
from vqgen.core.io import atomic_path, file_fingerprint, load_json, load_safetensors
from .layout import CodebookLayout
from .quantizers import Quantizer, QuantizerConfig, QuantizerOutput, build_quantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


ARCHS = ("papers", "vqgan")
# vqgan preset: channel multipliers per downsampling factor when channel_mult is not given (LlamaGen's VQ-16
# uses [1, 1, 2, 2, 4]; its VQ-8 [1, 2, 2, 4]).
VQGAN_CHANNEL_MULT = {2: [1, 2], 4: [1, 2, 4], 8: [1, 2, 2, 4], 16: [1, 1, 2, 2, 4], 32: [1, 1, 2, 2, 4, 4]}
# encode / decode / reconstruct process at most this many pixels per chunk, so their peak memory does not grow
# with the batch (16 images at 256x256, 1,024 at 32x32)
INFERENCE_PIXELS = 2**20


@dataclass
class ModelConfig:
    """Architecture of the VQ-VAE. ``quantizer.dim`` is the latent width the quantizer sees.

    ``arch=papers`` reads ``hidden``, ``res_hidden``, ``num_res_layers``; ``arch=vqgan`` reads ``hidden`` (base
    width), ``channel_mult`` (widths per level; null: the preset for ``downsample``), ``num_res_layers``
    (ResNet blocks per level), ``attention`` and ``activation_checkpointing``.
    """

    image_size: int = 32
    in_channels: int = 3
    hidden: int = 128
    res_hidden: int = 32
    num_res_layers: int = 2
    downsample: int = 4  # 2**k with k stride-2 convolutions; 4: 32x32 -> 8x8
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    arch: str = "papers"  # "papers" | "vqgan"
    channel_mult: list[int] | None = None  # vqgan: len = log2(downsample) + 1; null: VQGAN_CHANNEL_MULT
    attention: bool = True  # vqgan: self-attention at the lowest resolution and in the middle block
    # vqgan: recompute each ResNet / attention block's activations in the backward instead of keeping them
    # (torch.utils.checkpoint): less training memory for about one more forward pass of those blocks; same values
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2 (e.g. 4 or 8), got {self.downsample}")
        if self.arch == "papers" and self.channel_mult is not None:
            raise ValueError("channel_mult applies to arch=vqgan only; remove it or set arch=vqgan")
        if self.arch == "papers" and self.activation_checkpointing:
            raise ValueError("activation_checkpointing applies to arch=vqgan only; remove it or set arch=vqgan")
        if self.arch == "vqgan":
            levels = int(math.log2(self.downsample)) + 1
            if self.channel_mult is None and self.downsample not in VQGAN_CHANNEL_MULT:
                raise ValueError(f"arch=vqgan has no channel_mult preset for downsample {self.downsample}; give channel_mult")
            if self.channel_mult is not None and (len(self.channel_mult) != levels or min(self.channel_mult) < 1):
                raise ValueError(
                    f"channel_mult {self.channel_mult} must list {levels} positive multipliers for downsample "
                    f"{self.downsample} (one per level: log2(downsample) + 1)"
                )
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

    @property
    def channel_multipliers(self) -> list[int]:
        """vqgan: the width multiplier of every level, from ``channel_mult`` or the preset."""
        return list(self.channel_mult) if self.channel_mult is not None else list(VQGAN_CHANNEL_MULT[self.downsample])


@dataclass
class VQVAEOutput:
    """What one forward pass returns. ``quant`` is None in the continuous (unquantized) phase.

    The loss is not part of it: ``tokenizer.losses.TokenizerLoss`` composes the objective from ``recon`` and
    ``quant.loss``.
    """

    recon: torch.Tensor  # (B, C, H, W)
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
        self.out_channels = cfg.hidden

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
        self.in_channels = cfg.hidden

    @property
    def last_layer(self) -> nn.Module:
        """The transposed convolution that outputs the image."""
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------ vqgan preset


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in taming/LlamaGen (fewer where the width is not a multiple of 32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) x 2 plus a skip (1x1 conv when the width changes): (B, C_in, H, W) ->
    (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual: (B, C, H, W) -> (B, C, H, W).

    ``scaled_dot_product_attention`` never materialises the (HW, HW) matrix on backends with fused kernels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with taming's asymmetric padding: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _vqgan_level(channels: int, width: int, num_blocks: int, attention: bool) -> nn.Module:
    """One resolution level of the vqgan preset: ``num_blocks`` ResNet blocks to ``width`` channels, each followed
    by self-attention when ``attention`` (modules created block, attention, block, ...). The caller adds the
    resampling layer (``down`` or ``up``)."""
    level = nn.Module()
    blocks, attns = [], []
    for _ in range(num_blocks):
        blocks.append(ResnetBlock(channels, width))
        channels = width
        if attention:
            attns.append(AttnBlock(width))
    level.blocks, level.attns = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _block(module: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``module(h)``; with ``checkpointing`` (and autograd recording) its inner activations are recomputed in the
    backward instead of kept (only ``h`` is stored)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, h, use_reentrant=False)
    return module(h)


def _run_level(level: nn.Module, h: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """The blocks (and attention layers) of a :func:`_vqgan_level`, without its resampling layer."""
    for i, block in enumerate(level.blocks):
        h = _block(block, h, checkpointing)
        if len(level.attns):
            h = _block(level.attns[i], h, checkpointing)
    return h


def _run_middle(mid: nn.Sequential, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """The middle blocks of :func:`_vqgan_middle`, each checkpointed when ``checkpointing``."""
    for block in mid:
        h = _block(block, h, checkpointing)
    return h


def _vqgan_middle(channels: int, attention: bool) -> nn.Sequential:
    """ResNet block, self-attention (when ``attention``), ResNet block at the lowest resolution."""
    return nn.Sequential(ResnetBlock(channels, channels), AttnBlock(channels) if attention else nn.Identity(),
                         ResnetBlock(channels, channels))


class VQGANEncoder(nn.Module):
    """(B, C_in, H, W) -> (B, hidden * mult[-1], H/s, W/s); s = 2 ** (len(mult) - 1) (taming / LlamaGen)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = [cfg.hidden * m for m in cfg.channel_multipliers]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.hidden, 3, padding=1)
        self.levels = nn.ModuleList()
        channels = cfg.hidden
        for i, width in enumerate(widths):
            level = _vqgan_level(channels, width, cfg.num_res_layers, cfg.attention and i == last)
            channels = width
            level.down = Downsample(channels) if i < last else nn.Identity()
            self.levels.append(level)
        self.mid = _vqgan_middle(channels, cfg.attention)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)
        self.out_channels = channels
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(_run_level(level, h, self.checkpointing))
        h = _run_middle(self.mid, h, self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """(B, hidden * mult[-1], h, w) -> (B, C_in, h*s, w*s), the mirror of :class:`VQGANEncoder` with
    ``num_res_layers + 1`` blocks per level."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = [cfg.hidden * m for m in cfg.channel_multipliers]
        last = len(widths) - 1
        channels = widths[-1]
        self.in_channels = channels
        self.conv_in = nn.Conv2d(channels, channels, 3, padding=1)
        self.mid = _vqgan_middle(channels, cfg.attention)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = _vqgan_level(channels, widths[i], cfg.num_res_layers + 1, cfg.attention and i == last)
            channels = widths[i]
            level.up = Upsample(channels) if i > 0 else nn.Identity()
            self.levels.append(level)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, padding=1)
        self.checkpointing = cfg.activation_checkpointing

    @property
    def last_layer(self) -> nn.Module:
        """The convolution that outputs the image."""
        return self.conv_out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z), self.checkpointing)
        for level in self.levels:
            h = level.up(_run_level(level, h, self.checkpointing))
        return self.conv_out(F.silu(self.norm_out(h)))


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily put ``module`` in eval mode (no EMA updates, no Gumbel noise), then restore."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class VQVAE(nn.Module, ModelHubMixin, library_name=LIBRARY_NAME, tags=["image-tokenizer", "vq-vae"]):
    """Encoder -> 1x1 conv to ``quantizer.dim`` -> quantizer -> 1x1 conv back -> decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.quantizer: Quantizer = build_quantizer(cfg.quantizer)
        dim = self.quantizer.dim
        # built in this order (quantizer, encoder, pre_quant, post_quant, decoder): the order the initial weights
        # are drawn in, which the reference tests pin
        self.encoder = Encoder(cfg) if cfg.arch == "papers" else VQGANEncoder(cfg)
        latent_channels = self.encoder.out_channels  # what the decoder takes back (hidden for papers)
        self.pre_quant = nn.Conv2d(latent_channels, dim, 1)
        self.post_quant = nn.Conv2d(dim, latent_channels, 1)
        self.decoder = Decoder(cfg) if cfg.arch == "papers" else VQGANDecoder(cfg)

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
        return VQVAEOutput(recon=recon, quant=quant, z_e=z_e)

    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's output convolution: where the adaptive GAN weight compares gradients."""
        return self.decoder.last_layer.weight

    # ---------------------------------------------------------------- public token API
    def _chunks(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``batch`` split along the first axis into chunks of at most ``INFERENCE_PIXELS`` image pixels."""
        size = max(1, INFERENCE_PIXELS // (self.config.image_size * self.config.image_size))
        return batch.split(size) if batch.shape[0] > size else (batch,)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> token ids (B, h, w) int64 (joint ids for ``adaptive``).

        Runs in chunks of at most ``INFERENCE_PIXELS`` pixels, so memory does not grow with the batch.
        """
        with _eval_mode(self):
            return torch.cat([self.quantizer(self.encode_latents(x)).indices for x in self._chunks(images)])

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> images (B, C, H, W) (not clamped), in chunks like ``encode``."""
        h, w = self.config.grid
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (h, w):
            raise ValueError(f"expected token ids of shape (B, {h}, {w}), got {tuple(indices.shape)}")
        vocab = self.quantizer.codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got values outside that range")
        with _eval_mode(self):
            return torch.cat([self.decode_latents(self.quantizer.lookup(ids)) for ids in self._chunks(indices)])

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode then decode (eval mode), (B, C, H, W) -> (B, C, H, W), in chunks like ``encode``."""
        with _eval_mode(self):
            return torch.cat([self.forward(x).recon for x in self._chunks(images)])

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

    # ---------------------------------------------------------------- persistence (huggingface_hub mixin)
    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None,
                        model_card_kwargs: dict | None = None, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_to_hub_kwargs):
        """Write ``config.json`` + ``model.safetensors`` + a model card (``README.md``) into ``save_directory``,
        atomically as a whole; ``push_to_hub=True`` then uploads it (``repo_id``: default the folder name).

        ``model_card_kwargs``: ``training_config`` (the run's resolved config) and ``summary`` (its metrics), both
        shown in the card. ``config.json`` holds ``format_version`` and ``model`` (what
        ``from_pretrained`` reads, and what the tokenizer's fingerprint covers with the weights).
        """
        directory = Path(save_directory)
        with atomic_path(directory) as tmp:
            super().save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format_version": FORMAT_VERSION, "model": to_dict(self.config)}
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    def generate_model_card(self, *args, **kwargs):
        from huggingface_hub import ModelCard

        from vqgen.tokenizer.perceptual import random_trunk_warning

        cfg = self.config
        description = (
            f"A vqgen image tokenizer (VQ-VAE, `{cfg.arch}` architecture): {cfg.in_channels}x{cfg.image_size}x"
            f"{cfg.image_size} images in [-1, 1] -> {cfg.grid[0]}x{cfg.grid[1]} tokens from a `{cfg.quantizer.kind}` "
            f"quantizer with {self.quantizer.codebook_size} codes."
        )
        usage = ("from vqgen.tokenizer.model import VQVAE\n"
                 "tok = VQVAE.from_pretrained(\"<this folder or hub id>\")\n"
                 "ids = tok.encode(images)      # (B, C, H, W) in [-1, 1] -> (B, h, w) int64\n"
                 "recon = tok.decode(ids)")
        caveat = random_trunk_warning((kwargs.get("summary") or {}).get("perceptual"))
        if caveat:
            description += f"\n\n**Warning:** {caveat}."
        values = card_kwargs("vqgen tokenizer", description, usage, kwargs.get("training_config"), kwargs.get("summary"))
        return ModelCard.from_template(card_data=self._hub_mixin_info.model_card_data,
                                       template_str=CARD_TEMPLATE, **values)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, map_location: str | torch.device = "cpu",
                        **hub_kwargs) -> "VQVAE":
        """Rebuild a saved tokenizer from a local folder or a hub id (no training code involved).

        ``hub_kwargs`` (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ...) go to the hub download.
        """
        name = pretrained_model_name_or_path
        if not is_hub_id(name):
            return cls._load_folder(Path(name), map_location)
        # the mixin's protocol (``_from_pretrained``) with the snapshot fetched by ``tokenizer.hub.hub_folder``, so a
        # failing download is one line rather than the mixin's own config.json request
        return cls._from_pretrained(model_id=str(name), map_location=map_location, **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str | torch.device = "cpu", config=None,
                         **hub_kwargs) -> "VQVAE":
        folder = Path(model_id) if Path(model_id).is_dir() else hub_folder(model_id, "tokenizer", **hub_kwargs)
        return cls._load_folder(folder, map_location)

    @classmethod
    def _load_folder(cls, directory: Path, map_location: str | torch.device = "cpu") -> "VQVAE":
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
        if isinstance(saved.get("quantizer"), dict):  # written before per-kind configs: migrated here
            saved["quantizer"] = QuantizerConfig.migrate(saved["quantizer"])
        model = cls(from_dict(ModelConfig, saved))
        # load on the CPU first: safetensors rejects device strings such as "cpu:0" that Accelerate may hand out
        state = load_safetensors(weights_path, device="cpu")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise CorruptFileError(weights_path, f"its tensors do not fit {config_path}: {detail}") from None
        model._hub_mixin_config = meta
        return model.to(map_location).eval()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a saved tokenizer's weights: identifies exactly which tokenizer produced some tokens."""
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError(f"no tokenizer weights at {path}")
    return file_fingerprint(path)

