"""Adaptive dynamic quantization (Chen et al. 2024, arXiv 2407.04939).

A ladder of EMA codebooks of equal capacity W = N_i * D_i, each behind its own projections
C -> D_i -> quantize -> D_i -> C, and a selector (multi-head attention between a query from the encoder
output and one learned key per codebook) whose scores pass through a hard Gumbel-softmax that picks the
codebook, per image (default) or per position. Token ids live in one joint vocabulary:
codebook i's code j has id ``codebook_offsets[i] + j``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..stats import batch_stats, code_counts
from .base import Quantizer, QuantizerConfig, QuantizerOutput
from .ema import EMAQuantizer
from .gumbel import gumbel_softmax


def linear_tau(step: torch.Tensor, start: float, end: float, steps: int) -> torch.Tensor:
    """``start + (end - start) * min(step / steps, 1)`` as a 0-dim float tensor (no host sync)."""
    frac = (step.float() / steps).clamp(max=1.0)
    return start + (end - start) * frac


class AdaptiveQuantizer(Quantizer):
    """Selects one codebook of the (N_i, D_i) ladder per image or per position.

    Training: every codebook quantizes every input (the selector's gradient needs all outputs, and every
    EMA codebook is updated); output ``sum_i onehot_i * proj_out_i(q_i)`` with the straight-through hard
    Gumbel one-hot at temperature ``tau`` (linear schedule over training forwards, see
    ``QuantizerConfig``); loss = mean of the per-codebook commitment losses. Eval: argmax selection, no
    noise, and only the selected codebook quantizes each input; the loss is then the commitment loss
    averaged over positions.
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        ladder = cfg.ladder()  # [(N_i, D_i)]
        c = cfg.dim
        self.proj_in = nn.ModuleList(nn.Linear(c, d) for _, d in ladder)
        self.proj_out = nn.ModuleList(nn.Linear(d, c) for _, d in ladder)
        self.quantizers = nn.ModuleList(
            EMAQuantizer(
                dataclasses.replace(cfg, kind="ema", codebook_size=n, dim=d, kmeans_seed=cfg.kmeans_seed + i)
            )
            for i, (n, d) in enumerate(ladder)
        )
        self.num_heads = cfg.selector_heads
        self.query = nn.Linear(c, c)
        self.keys = nn.Parameter(torch.randn(len(ladder), c) / math.sqrt(c))  # (K_cb, C): one key per codebook
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        sizes = [n for n, _ in ladder]
        self.codebook_offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.register_buffer("_offsets", torch.tensor(self.codebook_offsets), persistent=False)  # (K_cb,)
        self.register_buffer("_ends", torch.tensor(sizes).cumsum(0), persistent=False)  # (K_cb,)

    @property
    def codebook_sizes(self) -> list[int]:
        return [q.config.codebook_size for q in self.quantizers]

    @property
    def num_codebooks(self) -> int:
        """Number of codebooks in the ladder."""
        return len(self.quantizers)

    def tau(self) -> torch.Tensor:
        """Current selector temperature, a pure function of ``num_steps``."""
        cfg = self.config
        return linear_tau(self.num_steps, cfg.selector_tau_start, cfg.selector_tau_end, cfg.selector_tau_steps)

    def selector_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of the codebooks: (B, L, C) -> (B, K_cb) for ``image``, (B, L, K_cb) for ``position``.

        Scaled dot products of each head's query with each codebook's key, averaged over the heads.
        """
        source = x.mean(dim=1) if self.config.granularity == "image" else x  # (B, C) or (B, L, C)
        head_dim = self.dim // self.num_heads
        q = self.query(source).unflatten(-1, (self.num_heads, head_dim))  # (..., H, dh)
        k = self.keys.unflatten(-1, (self.num_heads, head_dim))  # (K_cb, H, dh)
        scores = torch.einsum("...hd,khd->...hk", q, k) / math.sqrt(head_dim)  # (..., H, K_cb)
        return scores.mean(dim=-2)

    def _per_position(self, choice: torch.Tensor, length: int) -> torch.Tensor:
        """Selection (B, ...) per image or per position -> (M,) or (M, K_cb) per flattened position."""
        if self.config.granularity == "image":
            choice = choice.unsqueeze(1).expand(choice.shape[0], length, *choice.shape[1:])
        return choice.reshape(-1, *choice.shape[2:])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, C)
        x = flat.reshape(z.shape[0], -1, self.dim)  # (B, L, C)
        logits = self.selector_logits(x).float()  # (B, K_cb) or (B, L, K_cb)
        tau = self.tau()
        if self.training:
            weights = gumbel_softmax(logits, tau, hard=True)  # one-hot forward, soft gradient
            choice = weights.detach().argmax(dim=-1)  # (B,) or (B, L)
            self.num_steps += 1
            quantized, indices, loss = self._train_quantize(flat, self._per_position(weights, x.shape[1]))
        else:
            choice = logits.argmax(dim=-1)
            quantized, indices, loss = self._eval_quantize(flat, self._per_position(choice, x.shape[1]))
        stats = batch_stats(indices, self.codebook_size)
        stats["tau"] = tau
        stats["selection"] = code_counts(choice, self.num_codebooks) / choice.numel()  # (K_cb,)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape).to(z.dtype),
            indices=indices.reshape(z.shape[:-1]),
            loss=loss,
            stats=stats,
        )

    def _train_quantize(self, flat: torch.Tensor, weights: torch.Tensor):
        """All codebooks on all inputs: flat (M, C), weights (M, K_cb) one-hot -> (M, C), (M,), loss."""
        out = torch.zeros_like(flat)
        losses, ids = [], []
        for i, (p_in, vq, p_out) in enumerate(zip(self.proj_in, self.quantizers, self.proj_out)):
            q = vq(p_in(flat))  # codes of width D_i, EMA-updated
            out = out + weights[:, i : i + 1] * p_out(q.quantized)
            losses.append(q.loss)
            ids.append(q.indices + self.codebook_offsets[i])
        choice = weights.detach().argmax(dim=-1, keepdim=True)  # (M, 1)
        indices = torch.stack(ids, dim=1).gather(1, choice).squeeze(1)  # (M,) joint ids
        return out, indices, torch.stack(losses).mean()

    def _eval_quantize(self, flat: torch.Tensor, choice: torch.Tensor):
        """Only the selected codebook per position: flat (M, C), choice (M,) -> (M, C), (M,), loss.

        Finding each codebook's rows syncs with the host, which is fine outside training.
        """
        out = torch.zeros_like(flat)
        indices = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
        loss = flat.new_zeros(())
        for i, (p_in, vq, p_out) in enumerate(zip(self.proj_in, self.quantizers, self.proj_out)):
            rows = (choice == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            q = vq(p_in(flat[rows]))
            out[rows] = p_out(q.quantized).to(out.dtype)  # autocast may run the projection in bf16/fp16
            indices[rows] = q.indices + self.codebook_offsets[i]
            loss = loss + q.loss * (rows.numel() / flat.shape[0])
        return out, indices, loss

    def codebook_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Joint ids (any shape) -> which codebook each belongs to (same shape, int64)."""
        return torch.bucketize(indices, self._ends, right=True)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Joint ids (B, ...) -> back-projected codes (B, ..., C); each id uses its own codebook."""
        ids = indices.reshape(-1)  # (M,)
        which = self.codebook_of(ids)  # (M,)
        out = torch.zeros(ids.shape[0], self.dim, device=ids.device)
        for i, (vq, p_out) in enumerate(zip(self.quantizers, self.proj_out)):
            local = (ids - self.codebook_offsets[i]).clamp(0, vq.config.codebook_size - 1)
            out = torch.where((which == i).unsqueeze(1), p_out(vq.lookup(local)), out)
        return out.reshape(*indices.shape, self.dim)

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor) -> None:
        """k-means for every codebook on the vectors (M, C) projected by its own ``proj_in``."""
        vectors = self._check_vectors(vectors)
        for p_in, vq in zip(self.proj_in, self.quantizers):
            vq.init_codebook(p_in(vectors))

    def codebooks(self) -> list[torch.Tensor]:
        """The ladder's codebooks (N_i, D_i), before back-projection."""
        return [vq.embed.detach() for vq in self.quantizers]
