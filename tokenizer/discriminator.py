"""The PatchGAN discriminator of pix2pix / taming's VQGAN (``NLayerDiscriminator``).

``num_layers`` stride-2 4x4 convolutions (widths ``channels * min(2**n, 8)``), one stride-1 convolution and a
1-channel output convolution: (B, C, H, W) -> (B, 1, h', w') logits, one per overlapping patch (30x30 patches
of a 256-px image with 3 layers; 2x2 at 32 px). Weights start as in taming (conv N(0, 0.02), norm gains
N(1, 0.02)).

Normalisation: ``batch`` is taming's BatchNorm, here without running statistics (``track_running_stats=False``):
the discriminator only ever runs in training mode, where BatchNorm uses the batch's statistics anyway, and with no
buffers the replicas of a data-parallel run stay identical. ``group`` (GroupNorm) and ``none`` are the
alternatives. The discriminator is training state only: it lives in the checkpoints, never in ``model/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    """``loss.disc``: the PatchGAN and its optimizer (its own AdamW, constant learning rate)."""

    num_layers: int = 3  # stride-2 convolutions (taming: 3)
    channels: int = 64  # width of the first layer (taming: ndf = 64)
    norm: str = "batch"  # "batch" (no running statistics) | "group" | "none"
    lr: float | None = None  # null: train.lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # taming / LlamaGen
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError("disc.num_layers and disc.channels must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"disc.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"disc.lr must be positive (or null for train.lr), got {self.lr}")
        if len(self.betas) != 2 or self.weight_decay < 0:
            raise ValueError("disc.betas must be two numbers and disc.weight_decay >= 0")

    def min_image_size(self) -> int:
        """Smallest image side that still leaves at least one patch logit."""
        return 3 * 2**self.num_layers


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN: images (B, C, H, W) in [-1, 1] -> patch logits (B, 1, h', w')."""

    def __init__(self, in_channels: int, cfg: DiscriminatorConfig):
        super().__init__()
        ndf, bias = cfg.channels, cfg.norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                       _norm(cfg.norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**cfg.num_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
                   _norm(cfg.norm, ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class RealFake(nn.Module):
    """Both discriminator passes of one update in one ``forward`` (one call of the data-parallel wrapper):
    ``(real (B, C, H, W), fake (B, C, H, W)) -> (logits_real, logits_fake)``, each batch normalised on its own
    as in taming."""

    def __init__(self, discriminator: PatchDiscriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(in_channels: int, cfg: DiscriminatorConfig, seed: int) -> RealFake:
    """A :class:`RealFake`-wrapped PatchGAN initialised from its own generator (seeded by ``seed``), so adding a
    discriminator does not change the tokenizer's initialisation or the data order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RealFake(PatchDiscriminator(in_channels, cfg))
