"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2, "Language Model Beats Diffusion").

The code of ``z`` (D,) is its sign pattern, ``q = sign(z)`` in {-1, +1}^D (zero counts as +1): an implicit
codebook of ``2^D`` corners of the hypercube, searched by nothing. Token id: the bits ``q_d > 0`` read as a
binary number, dimension 0 the most significant. Straight-through gradient to ``z``.

Loss: ``beta * ||z - sg(q)||^2`` (commitment) plus ``entropy_weight * (E_z[H(p(.|z))] - gamma H(E_z[p(.|z)]))``
with the soft assignment ``p(c|z) ∝ exp(-||z - c||^2 / T)`` over the codes ``c``. Small per-sample entropy
makes each input confident, large codebook entropy spreads the batch over the codes.

Factorised, so the cost is O(M D) instead of O(M 2^D): ``||z - c||^2 = sum_d (z_d - c_d)^2`` makes
``p(c|z)`` a product over dimensions of Bernoulli distributions, ``p_d(+1|z) = sigmoid(4 z_d / T)``, hence
the per-sample entropy is exactly ``sum_d h(p_d)`` (``h`` the binary entropy). The batch mean of product
distributions is not a product, so the codebook term uses the sum of the per-dimension entropies of the
mean, ``sum_d h(E_z[p_d])``: the entropy of the product of the marginals, an upper bound of the joint
entropy ``H(E_z[p])`` that equals it when the bits are independent over the batch. Maximising it asks every
bit to be used half of the time; it cannot see correlations between bits. Under data parallelism the batch
mean is each process's own (as the per-process batch statistics of the other kinds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..stats import batch_stats
from .base import (
    MAX_IMPLICIT_CODES,
    CodebookOptions,
    CommitmentOptions,
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    QuantizerOutput,
    straight_through,
)
from .registry import Capabilities, register_quantizer

ENTROPY_EPS = 1e-6


@dataclass
class LFQConfig(CommitmentOptions, CodebookOptions, QuantizerConfig):
    """``lfq``: the sign of each of ``dim`` channels (``codebook_size = 2 ** dim``), commitment plus an entropy
    penalty factorised over the bits."""

    kind: str = "lfq"
    entropy_weight: float = 0.1  # weight of the entropy penalty (MAGVIT-v2)
    entropy_gamma: float = 1.0  # weight of the codebook-entropy term inside the penalty
    entropy_temperature: float = 0.01  # temperature of the soft assignment the entropies are taken of

    def check(self, fail) -> None:
        if self.entropy_weight < 0 or self.entropy_gamma < 0 or self.entropy_temperature <= 0:
            fail("entropy_weight and entropy_gamma must be >= 0 and entropy_temperature > 0, got "
                 f"{self.entropy_weight}, {self.entropy_gamma} and {self.entropy_temperature}")
        if 2**self.dim > MAX_IMPLICIT_CODES:
            fail(f"lfq with dim={self.dim} has 2**{self.dim} codes; at most {MAX_IMPLICIT_CODES} (the prior's vocabulary "
                 "and every code histogram hold one entry per code)")
        if self.codebook_size != 2**self.dim:
            fail(f"lfq's codes are the 2**dim sign patterns of its dim={self.dim} channels: codebook_size must be "
                 f"{2**self.dim}, got {self.codebook_size}; set codebook_size={2**self.dim} (or dim to its log2)")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy (nats) of Bernoulli(p), 0 at p in {0, 1}."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def lfq_entropies(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, codebook entropy of the marginals) in nats, for inputs ``z`` (M, D).

    ``x = 4 z / T`` is the log-odds of bit +1; ``h(sigmoid(x)) = softplus(x) - sigmoid(x) x`` avoids the logs
    of saturated probabilities.
    """
    x = z * (4.0 / temperature)  # (M, D)
    p = torch.sigmoid(x)
    per_sample = (F.softplus(x) - p * x).sum(dim=-1).mean()
    # a bit saturated over the whole batch has h'(p) = log((1 - p) / p) infinite: clamp (its gradient is 0 anyway)
    mean = p.mean(dim=0).clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS)  # (D,)
    codebook = binary_entropy(mean).sum()
    return per_sample, codebook


@register_quantizer(
    "lfq",
    config=LFQConfig,
    capabilities=Capabilities(learned_codebook=False, kmeans_init=False, dead_code_reset=False),
)
class LFQuantizer(Quantizer):
    """Sign quantization with commitment and factorised entropy losses (see the module docstring)."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        d = cfg.dim
        self.register_buffer("_bits", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64), persistent=False)  # (D,)
        self._size = 2**d

    @property
    def codebook_sizes(self) -> list[int]:
        return [self._size]

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """``tanh(z)``: in (-1, 1) like the codes, with the same sign as ``z`` (its code is its sign)."""
        return torch.tanh(z)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        cfg = self.config
        flat = self._flatten(z)  # (M, D)
        positive = flat.detach() >= 0  # (M, D) bool
        q = positive.float() * 2.0 - 1.0  # (M, D) in {-1, +1}
        idx = (positive.long() * self._bits).sum(dim=-1)  # (M,)
        loss = cfg.beta * F.mse_loss(flat, q) if cfg.beta > 0 else flat.new_zeros(())
        if cfg.entropy_weight > 0:
            per_sample, codebook = lfq_entropies(flat, cfg.entropy_temperature)
            loss = loss + cfg.entropy_weight * (per_sample - cfg.entropy_gamma * codebook)
        return QuantizerOutput(
            quantized=straight_through(flat, q).reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss,
            stats=batch_stats(idx, self._size),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        bits = torch.bitwise_and(indices.unsqueeze(-1), self._bits) > 0  # (..., D)
        return bits.float() * 2.0 - 1.0

    def code_vectors(self, codebook: int, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def codebooks(self) -> list[torch.Tensor]:
        """The implicit codebook: every sign pattern, (2^D, D), in id order."""
        return [self.lookup(torch.arange(self._size, device=self._bits.device))]

    def init_codebook(self, vectors: torch.Tensor) -> None:
        raise QuantizerConfigError(
            "quantizer: lfq has an implicit codebook (the sign patterns), so there is nothing to k-means-initialise; "
            "use schedule.init=random, or schedule.mode=deferred (continuous phase, then quantization is switched on)"
        )
