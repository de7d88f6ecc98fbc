"""The tokenizer's training objective as a module of its own (taming's ``VQLPIPSWithDiscriminator``, LlamaGen's
``VQLoss``): reconstruction (L1 or L2), quantizer loss, LPIPS perceptual loss and a PatchGAN adversarial loss
with the adaptive weight.

Generator side (per micro-batch), with ``x`` the images and ``x'`` the reconstruction::

    nll  = recon_weight * recon(x, x') + perceptual_weight * lpips(x, x')
    loss = nll + quantizer_weight * quantizer_loss + w_adv * g_loss(D(x'))        (g_loss only from disc_start on)
    w_adv = disc_weight * clamp(||grad_L nll|| / (||grad_L g_loss|| + 1e-4), 0, adaptive_weight_max)

where ``L`` is the decoder's last layer (``VQVAE.last_layer()``) and the ratio is detached (taming's
``calculate_adaptive_weight``); ``adaptive_weight=false`` uses ``w_adv = disc_weight``. Discriminator side:
``hinge``: ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x'))))`` with ``g_loss = -mean(D(x'))`` (taming);
``non_saturating``: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x'))))`` with ``g_loss = mean(softplus(-D(x')))``.

With every option at its default (L2, weights 1, no perceptual, no GAN) the loss is ``mse(x', x) + quantizer_loss``
(``tests/test_mse_reference.py`` holds its values for every kind).

Cost of the adaptive weight: two ``torch.autograd.grad`` calls per micro-batch that stop at the last layer, so
they backpropagate through LPIPS and the discriminator (not through the decoder body or the encoder): about one
extra backward pass of those two networks. Under data parallelism the gradients are the process's own (the
parameter is taken from the unwrapped model: ``autograd.grad`` runs no DDP hook), so the weight is per process, as
in taming's and LlamaGen's DDP training; the all-reduced gradients keep replicas identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .discriminator import DiscriminatorConfig
from .perceptual import PerceptualConfig

RECON_LOSSES = ("l1", "l2")
GAN_LOSSES = ("hinge", "non_saturating")


@dataclass
class LossConfig:
    """``loss``: what the tokenizer is trained to minimise. The defaults are MSE + quantizer loss."""

    recon: str = "l2"  # "l1" | "l2" (on the [-1, 1] scale)
    recon_weight: float = 1.0
    quantizer_weight: float = 1.0  # taming's codebook_weight
    perceptual_weight: float = 0.0  # LPIPS weight; 0: off (taming and LlamaGen: 1.0)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    disc_weight: float = 0.0  # adversarial weight; 0: no discriminator (taming: 0.8, LlamaGen: 0.5)
    disc_start: int | None = None  # optimizer step the GAN starts; null: when quantization starts (0, or ae_steps)
    disc_loss: str = "hinge"  # "hinge" | "non_saturating"
    adaptive_weight: bool = True  # scale by the ratio of gradient norms at the decoder's last layer
    adaptive_weight_max: float = 1e4  # clamp of that ratio (taming)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self) -> None:
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"recon must be one of {', '.join(RECON_LOSSES)}, got {self.recon!r}")
        if self.disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(GAN_LOSSES)}, got {self.disc_loss!r}")
        for name in ("recon_weight", "quantizer_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start is not None and self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0 (or null), got {self.disc_start}")
        if self.adaptive_weight_max <= 0:
            raise ValueError(f"adaptive_weight_max must be > 0, got {self.adaptive_weight_max}")

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual_weight > 0

    @property
    def uses_gan(self) -> bool:
        return self.disc_weight > 0


@dataclass
class GeneratorLoss:
    """What :meth:`TokenizerLoss.generator` returns: the scalar to backpropagate and its detached terms
    (``recon_loss``, ``recon_mse``, and where they apply ``quantizer_loss``, ``perceptual_loss``, ``gan_g_loss``,
    ``adaptive_weight``)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """``clamp(||d nll / d last_layer|| / (||d g_loss / d last_layer|| + eps), 0, max_weight)``, detached.

    Both gradients keep the graph (``retain_graph``) for the backward pass that follows.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, max_weight).detach()


def generator_adversarial(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's logits of reconstructions."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss: real images towards positive logits, reconstructions towards negative."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class TokenizerLoss(nn.Module):
    """The objective of one tokenizer run. ``perceptual`` is the frozen LPIPS module (None when unused); it is
    rebuilt from the config, never saved."""

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        if cfg.uses_perceptual and perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 needs the perceptual network (tokenizer.perceptual)")
        self.cfg = cfg
        self.perceptual = perceptual

    def gan_starts(self, quantize_step: int) -> int | None:
        """The optimizer step from which the GAN terms apply (None: no GAN); ``quantize_step`` is where
        quantization starts (``disc_start`` null follows it)."""
        if not self.cfg.uses_gan:
            return None
        return self.cfg.disc_start if self.cfg.disc_start is not None else quantize_step

    def perceptual_distance(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (scalar); grey images are repeated to 3 channels."""
        if images.shape[1] == 1:
            images, recon = images.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1)
        return self.perceptual(images.contiguous(), recon.contiguous()).mean()

    def generator(self, images: torch.Tensor, recon: torch.Tensor, quantizer_loss: torch.Tensor | None,
                  logits_fake: torch.Tensor | None = None, last_layer: torch.Tensor | None = None) -> GeneratorLoss:
        """The tokenizer's loss for one micro-batch.

        ``logits_fake``: the discriminator's logits of ``recon`` (with the discriminator's parameters detached),
        or None before the GAN starts; ``last_layer``: the decoder's last weight, needed for the adaptive weight.
        """
        cfg = self.cfg
        mse = F.mse_loss(recon, images)
        recon_loss = mse if cfg.recon == "l2" else F.l1_loss(recon, images)
        nll = recon_loss if cfg.recon_weight == 1.0 else cfg.recon_weight * recon_loss
        terms = {"recon_loss": recon_loss.detach(), "recon_mse": mse.detach()}
        if cfg.uses_perceptual:
            p_loss = self.perceptual_distance(images, recon)
            nll = nll + cfg.perceptual_weight * p_loss
            terms["perceptual_loss"] = p_loss.detach()
        loss = nll
        if quantizer_loss is not None:
            loss = loss + (quantizer_loss if cfg.quantizer_weight == 1.0 else cfg.quantizer_weight * quantizer_loss)
            terms["quantizer_loss"] = quantizer_loss.detach()
        if logits_fake is not None:
            g_loss = generator_adversarial(logits_fake, cfg.disc_loss)
            if cfg.adaptive_weight:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs the decoder's last layer (VQVAE.last_layer())")
                weight = cfg.disc_weight * adaptive_weight(nll, g_loss, last_layer, cfg.adaptive_weight_max)
            else:
                weight = torch.tensor(cfg.disc_weight, device=g_loss.device)
            loss = loss + weight * g_loss
            terms.update(gan_g_loss=g_loss.detach(), adaptive_weight=weight.detach(),
                         logits_fake=logits_fake.detach().float().mean())
        return GeneratorLoss(loss=loss, terms=terms)

    def discriminator(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss and its detached terms (``disc_loss``, ``logits_real``, ``logits_fake``)."""
        d_loss = discriminator_loss(logits_real, logits_fake, self.cfg.disc_loss)
        return d_loss, {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
                        "logits_fake": logits_fake.detach().float().mean()}
