"""VQ with an exponential-moving-average codebook and Laplace smoothing (VQ-VAE appendix, Sonnet)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqgen.core.distributed import all_reduce_
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
    SmoothingOptions,
    pass_gradient,
)
from .registry import Capabilities, register_quantizer


@dataclass
class EMAConfig(KMeansOptions, DeadCodeOptions, RotationOptions, SmoothingOptions, DecayOptions, CommitmentOptions,
                CodebookOptions, QuantizerConfig):
    """``ema``: an EMA codebook with Laplace smoothing; only the commitment loss reaches the encoder."""

    kind: str = "ema"


@register_quantizer(
    "ema",
    config=EMAConfig,
    capabilities=Capabilities(learned_codebook=True, kmeans_init=True, dead_code_reset=True),
)
class EMAQuantizer(SingleCodebookQuantizer):
    """Codebook updated by EMA instead of gradients; only the commitment loss reaches the encoder.

    Per training step, after the assignment and in no_grad, with counts n_k and sums s_k summed over
    processes: ``N_k <- g N_k + (1-g) n_k``, ``m_k <- g m_k + (1-g) s_k``,
    ``N'_k = (N_k + eps) / (N + K eps) * N`` with ``N = sum_k N_k``, ``e_k = m_k / N'_k``.
    The codebook, ``cluster_size`` (N_k) and ``embed_avg`` (m_k) are buffers. They start at
    ``N_k = 1, m_k = e_k`` so that ``e_k = m_k / N'_k`` already holds and unused codes keep their value.
    The output is quantized with the codebook from before this step's update. ``rotation_trick`` replaces
    straight-through's gradient copy by the rotation-and-rescale map (``base.rotation_trick``).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        embed = torch.randn(cfg.codebook_size, cfg.dim)  # (K, D)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))  # (K,)
        self.register_buffer("embed_avg", embed.clone())  # (K, D)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, D)
        with torch.no_grad():
            idx = nearest(flat.detach(), self.embed)  # (M,)
            q = F.embedding(idx, self.embed)  # (M, D), a copy: unaffected by the update below
            if self.training:
                self.ema_update(flat.detach(), idx)
        loss = self.config.beta * F.mse_loss(flat, q)
        quantized = pass_gradient(flat, q, self.config.rotation_trick)  # (M, D)
        if self.training:
            self._maybe_reset_dead_codes(flat)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss,
            stats=batch_stats(idx, self.config.codebook_size),
        )

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step from inputs ``flat`` (M, D) assigned to codes ``idx`` (M,), summed over processes."""
        k, d = self.embed.shape
        g = self.config.decay
        # sums and counts in one scatter (index_add, never a dense (M, K) one-hot) and one all-reduce
        augmented = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)  # (M, D + 1)
        totals = all_reduce_(flat.new_zeros(k, d + 1).index_add_(0, idx, augmented))  # (K, D + 1)
        self.cluster_size.mul_(g).add_(totals[:, d], alpha=1.0 - g)
        self.embed_avg.mul_(g).add_(totals[:, :d], alpha=1.0 - g)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.config.eps) / (n + k * self.config.eps) * n  # (K,)
        torch.div(self.embed_avg, smoothed.unsqueeze(1), out=self.embed)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.embed)

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor) -> None:
        vectors = self._check_vectors(vectors)
        centers = distributed_kmeans(vectors, self.config.codebook_size, self.config.kmeans_iters, self.config.kmeans_seed)
        self.embed.copy_(centers)
        self.embed_avg.copy_(centers)
        self.cluster_size.fill_(1.0)

    def codebooks(self) -> list[torch.Tensor]:
        return [self.embed.detach()]

    def usage_counts(self) -> torch.Tensor:
        return self.cluster_size

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.embed, self.cluster_size, self.embed_avg]

    def _reseed(self, dead: torch.Tensor, samples: torch.Tensor, count: float) -> None:
        self.embed[dead] = samples
        self.embed_avg[dead] = samples * count
        self.cluster_size[dead] = count
