"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear Layer").

The codes are ``C W``: a frozen codebook ``C`` (K, D) (a buffer, never updated by gradients) through one
learned linear map ``W`` (D, D). The VQ losses are the usual ones on these codes,
``||sg(z) - (CW)_k||^2 + beta ||z - sg((CW)_k)||^2``, so the codebook term trains ``W`` alone: every step
moves *all* codes together through the shared map instead of only the selected ones, which is what keeps
codes from dying. Straight-through (or, with ``rotation_trick``, rotation-trick) gradient to the encoder.

``C`` starts as Gaussian N(0, 1/D) and ``W`` as the identity. k-means initialisation (``init_codebook``,
used by ``schedule.init=kmeans`` and deferred quantization) sets the *frozen* codebook to the k-means
centres and resets ``W`` to the identity, so the codes start at the centres and then move together. (Fitting
``W`` alone to the centres would leave a rank-D linear image of random vectors: it cannot place K > D codes.)
No dead-code reset: the shared map is SimVQ's answer to dead codes.
"""

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
    KMeansOptions,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    RotationOptions,
    pass_gradient,
)
from .registry import Capabilities, register_quantizer


@dataclass
class SimVQConfig(KMeansOptions, RotationOptions, CommitmentOptions, CodebookOptions, QuantizerConfig):
    """``simvq``: a frozen random codebook through one learned linear map."""

    kind: str = "simvq"


@register_quantizer(
    "simvq",
    config=SimVQConfig,
    capabilities=Capabilities(learned_codebook=True, kmeans_init=True, dead_code_reset=False),
)
class SimVQuantizer(Quantizer):
    """Frozen codebook ``frozen`` (K, D) (buffer) through the learned map ``map`` (D, D): codes = frozen @ map."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        k, d = cfg.codebook_size, cfg.dim
        self.register_buffer("frozen", torch.randn(k, d) * d**-0.5)  # (K, D)
        self.map = nn.Parameter(torch.eye(d))  # (D, D)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size]

    def codes(self) -> torch.Tensor:
        """(K, D) the current codes ``C W`` (differentiable in ``W``), in float32 even under autocast."""
        with torch.autocast(self.frozen.device.type, enabled=False):
            return self.frozen @ self.map

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, D)
        with torch.no_grad():
            idx = nearest(flat, self.codes())  # (M,)
        # gather the frozen rows first, then map: the map's gradient is (M, D)^T (M, D), not (K, D)^T (K, D);
        # float32 like the search, so the output is the code lookup() gives
        with torch.autocast(flat.device.type, enabled=False):
            q = F.embedding(idx, self.frozen) @ self.map  # (M, D)
        loss = F.mse_loss(q, flat.detach()) + self.config.beta * F.mse_loss(flat, q.detach())
        return QuantizerOutput(
            quantized=pass_gradient(flat, q, self.config.rotation_trick).reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss,
            stats=batch_stats(idx, self.config.codebook_size),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.frozen) @ self.map.detach()

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor) -> None:
        """k-means centres of ``vectors`` (M, D) become the frozen codebook; the map restarts at the identity."""
        vectors = self._check_vectors(vectors)
        cfg = self.config
        centers = distributed_kmeans(vectors, cfg.codebook_size, cfg.kmeans_iters, cfg.kmeans_seed)
        self.frozen.copy_(centers)
        self.map.data.copy_(torch.eye(self.dim, device=self.map.device))

    def codebooks(self) -> list[torch.Tensor]:
        return [self.codes().detach()]
