"""Standard VQ with a straight-through estimator (van den Oord et al.), optionally with cosine codes or the
rotation trick (Fifty et al. 2024) in place of straight-through."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kmeans import distributed_kmeans
from ..search import nearest
from ..stats import batch_stats
from .base import (
    CodebookOptions,
    CommitmentOptions,
    DeadCodeOptions,
    DecayOptions,
    KMeansOptions,
    QuantizerConfig,
    QuantizerOutput,
    RotationOptions,
    SingleCodebookQuantizer,
    pass_gradient,
)
from .registry import Capabilities, register_quantizer


@dataclass
class VQConfig(KMeansOptions, DeadCodeOptions, RotationOptions, DecayOptions, CommitmentOptions, CodebookOptions,
               QuantizerConfig):
    """``vq``: a learned codebook (a parameter) with codebook and commitment losses."""

    kind: str = "vq"
    cosine: bool = False  # l2-normalised inputs and codes

    def check(self, fail) -> None:
        if self.cosine and self.dim < 2:
            fail("cosine=true needs dim >= 2 (a normalised 1-d code is just a sign)")


@register_quantizer(
    "vq",
    config=VQConfig,
    capabilities=Capabilities(learned_codebook=True, kmeans_init=True, dead_code_reset=True),
)
class VQQuantizer(SingleCodebookQuantizer):
    """Learned codebook (a parameter); loss ``||sg(z) - e||^2 + beta ||z - sg(e)||^2``.

    This is the correct form (codebook term pulls the codes, commitment term pulls the encoder); the seed
    paper's printed formula swaps the stop-gradients. With ``cosine`` inputs and codes are l2-normalised
    before the search, so the output is the normalised code. With ``rotation_trick`` the output has the
    same value and the encoder's gradient is rotated and rescaled (see ``base.rotation_trick``).
    ``decay`` is the EMA of code usage that the dead-code threshold is compared with.
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        k = cfg.codebook_size
        self.codebook = nn.Parameter(torch.empty(k, cfg.dim).uniform_(-1.0 / k, 1.0 / k))  # (K, D)
        if self.dead_code_enabled:
            self.register_buffer("usage_ema", torch.ones(k))

    def codes(self) -> torch.Tensor:
        """(K, D) codes as used for quantization (normalised when ``cosine``)."""
        return F.normalize(self.codebook, dim=-1) if self.config.cosine else self.codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, D)
        if self.config.cosine:
            flat = F.normalize(flat, dim=-1)
        codes = self.codes()  # (K, D)
        with torch.no_grad():
            idx = nearest(flat.detach(), codes.detach())  # (M,)
        q = F.embedding(idx, codes)  # (M, D), gradient reaches the codebook
        loss = F.mse_loss(q, flat.detach()) + self.config.beta * F.mse_loss(flat, q.detach())
        quantized = pass_gradient(flat, q, self.config.rotation_trick)  # (M, D)
        if self.training and self.dead_code_enabled:
            self._track_usage(idx)
            self._maybe_reset_dead_codes(flat)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss,
            stats=batch_stats(idx, self.config.codebook_size),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codes().detach())

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor) -> None:
        vectors = self._check_vectors(vectors)
        if self.config.cosine:
            vectors = F.normalize(vectors, dim=-1)
        centers = distributed_kmeans(vectors, self.config.codebook_size, self.config.kmeans_iters, self.config.kmeans_seed)
        self.codebook.data.copy_(centers)

    def codebooks(self) -> list[torch.Tensor]:
        return [self.codes().detach()]

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.codebook, self.usage_ema]

    def _reseed(self, dead: torch.Tensor, samples: torch.Tensor, count: float) -> None:
        self.codebook.data[dead] = samples
        self.usage_ema[dead] = count
