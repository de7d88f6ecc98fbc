"""Reconstruction quality: per-image MSE, PSNR and SSIM, and one pass of a tokenizer over a split.

Images are (B, C, H, W) in [-1, 1]. MSE is reported on images scaled to [0, 1] (the [-1, 1] MSE / 4),
as the training logs of ``pipelines.train_tokenizer`` do; PSNR = 10 log10(1 / MSE) on that scale; SSIM follows Wang et al. 2004 (Gaussian window 11, sigma 1.5,
K1 = 0.01, K2 = 0.03, valid convolution, mean over pixels and channels); for images smaller than
11 pixels the window shrinks to the largest odd size that fits.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F

from .diversity import LatentMoments, code_histogram
from .fid import images_to_uint8

__all__ = ["ReconstructionMeter", "SplitPass", "mse", "psnr", "reconstruction_errors", "ssim", "tokenizer_pass"]

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale, (B,)."""
    _check_pair(x, y)
    return ((x.double() - y.double()) / DATA_RANGE).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,); identical images give a finite cap (MSE floored at 1e-10)."""
    return -10 * torch.log10(mse(x, y).clamp(min=1e-10))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """The 1-D normalised Gaussian (size,); the 2-D window is its outer product, applied as two 1-D passes."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity, (B,)."""
    _check_pair(x, y)
    size = min(window, x.shape[-1], x.shape[-2])
    size = size if size % 2 == 1 else size - 1
    c = x.shape[1]
    g = _gaussian_window(size, sigma).to(x.device)
    rows, cols = g.view(1, 1, 1, size).expand(c, -1, -1, -1), g.view(1, 1, size, 1).expand(c, -1, -1, -1)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # the separable 2-D Gaussian: size/2 times fewer operations
        return F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)  # (B, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def reconstruction_errors(images: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ``mse``, ``psnr``, ``ssim`` (each (B,) float64) of ``recon`` clamped to [-1, 1]."""
    recon = recon.clamp(-1, 1)
    return {"mse": mse(images, recon), "psnr": psnr(images, recon), "ssim": ssim(images, recon)}


class ReconstructionMeter:
    """Accumulates per-image errors over any number of batches; ``summary()`` gives split means."""

    def __init__(self):
        self._values: dict[str, list[torch.Tensor]] = {"mse": [], "psnr": [], "ssim": []}

    def update(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Add one batch (B, C, H, W) of originals and reconstructions."""
        for key, value in reconstruction_errors(images, recon).items():
            self._values[key].append(value.cpu())

    @property
    def per_image(self) -> dict[str, torch.Tensor]:
        """All per-image values so far, each (N,) float64."""
        return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for k, v in self._values.items()}

    def summary(self) -> dict[str, float]:
        """Means over every image seen: ``mse``, ``psnr``, ``ssim``, and ``num_images``."""
        per = self.per_image
        if per["mse"].numel() == 0:
            raise ValueError("no images were measured")
        return {**{k: float(v.mean()) for k, v in per.items()}, "num_images": int(per["mse"].numel())}


@dataclasses.dataclass
class SplitPass:
    """What one pass of a tokenizer over a split yields (everything the report needs from the data).

    ``indices`` (N, h, w) int64; ``real``/``recon`` uint8 (N, 3, H, W); ``labels`` (N,); ``factors``
    (N, F); ``latent_sample`` (<= max_latents, D) encoder outputs, the first ones seen, and ``latents`` their
    moments, both in the space of the codes (``quantizer.continuous``: the encoder outputs themselves for
    codebook quantizers, bounded for ``fsq``, tanh for ``lfq``).
    """

    meter: ReconstructionMeter
    code_counts: torch.Tensor
    latents: LatentMoments
    latent_sample: torch.Tensor
    indices: torch.Tensor
    real: torch.Tensor
    recon: torch.Tensor
    labels: torch.Tensor
    factors: torch.Tensor


@torch.no_grad()
def tokenizer_pass(model, batches: Iterable[dict], device: str | torch.device = "cpu", max_images: int | None = None,
                   max_latents: int = 20000) -> SplitPass:
    """Encode, decode and measure every image of ``batches`` (dicts with ``image`` (B, C, H, W) in [-1, 1]).

    ``model`` follows the VQVAE contract (``encode``, ``decode``, ``encode_latents``, ``quantizer``).
    Stops after ``max_images`` images.
    """
    model.eval()
    meter = ReconstructionMeter()
    num_codes = int(model.quantizer.codebook_size)
    counts = torch.zeros(num_codes, dtype=torch.long)
    moments = None
    latents, indices, real, recon, labels, factors = [], [], [], [], [], []
    seen, kept_latents = 0, 0
    for batch in batches:
        x = batch["image"]
        if max_images is not None:
            x = x[: max_images - seen]
        if x.shape[0] == 0:
            break
        b = x.shape[0]
        x = x.to(device)
        z_e = model.quantizer.continuous(model.encode_latents(x))  # (B, h, w, D) in the space of the codes
        ids = model.encode(x)  # (B, h, w)
        out = model.decode(ids).clamp(-1, 1)  # (B, C, H, W)
        meter.update(x, out)
        counts += code_histogram(ids, num_codes)
        if moments is None:
            moments = LatentMoments(z_e.shape[-1])
        moments.update(z_e)
        if kept_latents < max_latents:
            flat = z_e.reshape(-1, z_e.shape[-1])[: max_latents - kept_latents].double().cpu()
            latents.append(flat)
            kept_latents += flat.shape[0]
        indices.append(ids.cpu())
        real.append(images_to_uint8(x).cpu())
        recon.append(images_to_uint8(out).cpu())
        labels.append(batch.get("label", torch.full((b,), -1))[:b].reshape(b).long())
        factors.append(batch.get("factors", torch.zeros(b, 0))[:b].reshape(b, -1).long())
        seen += b
        if max_images is not None and seen >= max_images:
            break
    if seen == 0:
        raise ValueError("the split has no images to evaluate")
    return SplitPass(meter, counts, moments, torch.cat(latents), torch.cat(indices), torch.cat(real),
                     torch.cat(recon), torch.cat(labels), torch.cat(factors))
