"""Gumbel-softmax VQ (as in VQGAN's Gumbel model): logits -> relaxed one-hot -> mixture of codes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kmeans import distributed_kmeans
from ..stats import batch_stats
from .base import (
    CodebookOptions,
    DeadCodeOptions,
    DecayOptions,
    KMeansOptions,
    QuantizerConfig,
    QuantizerOutput,
    SingleCodebookQuantizer,
    check_schedule,
)
from .registry import Capabilities, register_quantizer


def exponential_tau(step: torch.Tensor, start: float, end: float, steps: int) -> torch.Tensor:
    """``start * (end / start) ** min(step / steps, 1)`` as a 0-dim float tensor (no host sync)."""
    frac = (step.float() / steps).clamp(max=1.0)
    return start * torch.exp(frac * math.log(end / start))  # Python scalars only: no host-to-device copy


def gumbel_softmax(logits: torch.Tensor, tau: torch.Tensor, hard: bool) -> torch.Tensor:
    """Relaxed one-hot sample over the last axis; ``hard``: one-hot forward, soft gradient (straight-through).

    ``tau`` may be a tensor (unlike ``F.gumbel_softmax``'s documented float), so the schedule never syncs.
    """
    gumbels = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1) noise
    soft = ((logits + gumbels) / tau).softmax(dim=-1)
    if not hard:
        return soft
    # scatter rather than F.one_hot, whose input range check may sync with the host
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot + soft - soft.detach()


@dataclass
class GumbelConfig(KMeansOptions, DeadCodeOptions, DecayOptions, CodebookOptions, QuantizerConfig):
    """``gumbel``: Gumbel-softmax over learned logits, KL to uniform, an exponentially annealed temperature
    ``tau = tau_start * (tau_end / tau_start) ** min(t / tau_anneal_steps, 1)`` (1 -> 1/16 as in VQGAN's Gumbel
    model) over the optimizer steps ``t`` of the quantized phase."""

    kind: str = "gumbel"
    kl_weight: float = 5e-4  # weight of KL(q || uniform)
    straight_through: bool = False  # hard one-hot samples with straight-through gradients
    tau_start: float = 1.0
    tau_end: float = 0.0625
    tau_anneal_steps: int = 10000

    def check(self, fail) -> None:
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            fail(f"kl_weight must be a finite number >= 0, got {self.kl_weight}")
        check_schedule(fail, "tau", self.tau_start, self.tau_end, self.tau_anneal_steps)


@register_quantizer(
    "gumbel",
    config=GumbelConfig,
    # codes come from learned logits, not from the nearest entry: a trainer does not k-means-initialise it
    capabilities=Capabilities(learned_codebook=True, kmeans_init=False, dead_code_reset=True),
)
class GumbelQuantizer(SingleCodebookQuantizer):
    """``logits = proj(z)`` (the 1x1 conv to K, a Linear on channel-last input); ``z_q = sum_k y_k e_k``.

    Loss ``kl_weight * sum_k q_k log(q_k K)`` (KL of q = softmax(logits) to uniform), averaged over
    positions. Training samples ``y`` with the temperature of ``num_steps`` (optimizer steps, advanced by
    ``step_schedule()``; exponential schedule, see ``QuantizerConfig``); indices are the argmax of the sample. At eval: argmax of the logits, no noise,
    the output is exactly the code. k-means initialisation and dead-code resets set the codes and make the
    logits the negative squared distance up to a per-input constant (``w_k = 2 e_k, b_k = -||e_k||^2``).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self.proj = nn.Linear(cfg.dim, cfg.codebook_size)
        self.embed = nn.Parameter(torch.randn(cfg.codebook_size, cfg.dim))  # (K, D)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        if self.dead_code_enabled:
            self.register_buffer("usage_ema", torch.ones(cfg.codebook_size))

    def schedule(self) -> tuple[str, int]:
        return "tau_anneal_steps", self.config.tau_anneal_steps

    def tau_at(self, step: int) -> float:
        cfg = self.config
        return float(exponential_tau(torch.tensor(step), cfg.tau_start, cfg.tau_end, cfg.tau_anneal_steps))

    def tau(self) -> torch.Tensor:
        """Current temperature, a pure function of ``num_steps``."""
        cfg = self.config
        return exponential_tau(self.num_steps, cfg.tau_start, cfg.tau_end, cfg.tau_anneal_steps)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, D)
        logits = self.proj(flat).float()  # (M, K)
        tau = self.tau()
        if self.training:
            y = gumbel_softmax(logits, tau, self.config.straight_through)  # (M, K)
            idx = y.detach().argmax(dim=-1)  # (M,)
            q = y @ self.embed  # (M, D)
        else:
            idx = logits.argmax(dim=-1)
            q = F.embedding(idx, self.embed)
        log_q = logits.log_softmax(dim=-1)  # (M, K)
        kl = (log_q.exp() * (log_q + math.log(self.config.codebook_size))).sum(dim=-1).mean()
        if self.training and self.dead_code_enabled:
            self._track_usage(idx)
            self._maybe_reset_dead_codes(flat)
        stats = batch_stats(idx, self.config.codebook_size)
        stats["tau"] = tau
        return QuantizerOutput(
            quantized=q.reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=self.config.kl_weight * kl,
            stats=stats,
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.embed.detach())

    @torch.no_grad()
    def _set_codes(self, rows: torch.Tensor | slice, codes: torch.Tensor) -> None:
        """Codes ``codes`` (n, D) for ``rows``, with logits = 2 x.e - ||e||^2 for them."""
        self.embed.data[rows] = codes
        self.proj.weight.data[rows] = 2.0 * codes
        self.proj.bias.data[rows] = -codes.square().sum(dim=1)

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor) -> None:
        vectors = self._check_vectors(vectors)
        centers = distributed_kmeans(vectors, self.config.codebook_size, self.config.kmeans_iters, self.config.kmeans_seed)
        self._set_codes(slice(None), centers)

    def codebooks(self) -> list[torch.Tensor]:
        return [self.embed.detach()]

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.embed, self.proj.weight, self.proj.bias, self.usage_ema]

    def _reseed(self, dead: torch.Tensor, samples: torch.Tensor, count: float) -> None:
        self._set_codes(dead, samples)
        self.usage_ema[dead] = count
