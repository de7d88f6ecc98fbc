"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``d = len(levels)`` latent channels is bounded to ``L_i`` values and rounded; the implicit
codebook is the grid of every combination, ``prod(levels)`` codes, with nothing learned and no auxiliary loss.

Bounding (the paper's appendix, written here from its equations): with ``h_i = (L_i - 1)(1 - 1e-3) / 2``,
``o_i = 0.5`` for even ``L_i`` (else 0) and ``s_i = atanh(o_i / h_i)``,
``bound(z)_i = tanh(z_i + s_i) h_i - o_i``, which lies in ``(-L_i/2, L_i/2 - 1]`` for even ``L_i`` and in
``(-(L_i-1)/2, (L_i-1)/2)`` for odd ones, so rounding gives exactly ``L_i`` integers, and ``bound(0) = 0``.
(The paper's listing shifts by ``tan`` instead of ``atanh``; the two agree to first order and only ``atanh``
makes ``bound(0) = 0`` exact.) The code is ``round(bound(z)) / w_i`` with ``w_i = L_i // 2``, so every
coordinate lies in [-1, 1]; rounding passes the gradient straight through.

Token ids are the mixed-radix number of the integer levels ``k_i = round(bound(z)_i) + w_i`` in
``[0, L_i)``: ``id = sum_i k_i * prod_{j<i} L_j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..stats import batch_stats
from .base import MAX_IMPLICIT_CODES, Quantizer, QuantizerConfig, QuantizerConfigError, QuantizerOutput
from .registry import Capabilities, register_quantizer

BOUND_EPS = 1e-3  # keeps tanh's range strictly inside the outermost rounding boundaries


@dataclass
class FSQConfig(QuantizerConfig):
    """``fsq``: each of ``dim = len(levels)`` channels bounded and rounded to ``levels[i]`` values; the vocabulary
    is the ``prod(levels)`` grid points."""

    kind: str = "fsq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # values per latent channel

    def check(self, fail) -> None:
        if not self.levels or min(self.levels) < 3:
            fail(f"levels must list at least one channel with >= 3 values each (e.g. [8, 5, 5, 5]), got {self.levels}; "
                 "for binary codes use kind lfq")
        if self.dim != len(self.levels):
            fail(f"fsq quantizes each latent channel to its own levels: dim ({self.dim}) must equal len(levels) "
                 f"({len(self.levels)}); set dim={len(self.levels)}")
        if math.prod(self.levels) > MAX_IMPLICIT_CODES:
            fail(f"levels {self.levels} give {math.prod(self.levels)} codes; at most {MAX_IMPLICIT_CODES} (the prior's "
                 "vocabulary and every code histogram hold one entry per code)")


class _BoundRound(torch.autograd.Function):
    """``round(tanh(z + s) h - o) / w`` with the straight-through gradient ``h (1 - tanh^2) / w`` in one node.

    One autograd node instead of five (add, tanh, scale, round, rescale): the backward is one fused
    expression of the saved ``tanh``, and no intermediate of the chain is kept for it.
    """

    @staticmethod
    def forward(ctx, z, shift, half_l, neg_offset, width, slope):
        t = torch.tanh(z + shift)  # (M, d)
        rounded = torch.round(torch.addcmul(neg_offset, t, half_l))  # integers in [-w_i, L_i - 1 - w_i]
        ctx.save_for_backward(t, slope)
        ctx.mark_non_differentiable(rounded)
        return rounded / width, rounded

    @staticmethod
    def backward(ctx, grad, _):
        t, slope = ctx.saved_tensors
        # tanh_backward(g, t) = g (1 - t^2) in one fused kernel
        return torch.ops.aten.tanh_backward(grad * slope, t), None, None, None, None, None


@register_quantizer(
    "fsq",
    config=FSQConfig,
    capabilities=Capabilities(learned_codebook=False, kmeans_init=False, dead_code_reset=False),
)
class FSQuantizer(Quantizer):
    """Bound, round, rescale each channel; ids are mixed-radix numbers over the level grid. Loss 0."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        levels = torch.tensor(cfg.levels, dtype=torch.float64)
        half_l = (levels - 1) * (1 - BOUND_EPS) / 2
        offset = (levels.remainder(2) == 0).double() * 0.5
        width = torch.div(levels, 2, rounding_mode="floor")
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), levels[:-1]]), 0)
        # constants of the grid, rebuilt from the config: not part of the state dict
        self.register_buffer("_half_l", half_l.float(), persistent=False)  # (d,)
        self.register_buffer("_neg_offset", -offset.float(), persistent=False)
        self.register_buffer("_slope", (half_l / width).float(), persistent=False)  # h / w: d(code)/d(tanh)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_width", width.float(), persistent=False)
        self.register_buffer("_levels", levels.long(), persistent=False)
        self.register_buffer("_basis", basis.float(), persistent=False)  # exact: prod(levels) <= 2**20 < 2**24
        self.register_buffer("_basis_long", basis.long(), persistent=False)
        # id = sum_i (round_i + w_i) * basis_i = rounded @ basis + sum_i w_i basis_i
        self._id_offset = float((width * basis).sum())
        self._size = int(math.prod(cfg.levels))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self._size]

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``tanh(z + s) h - o`` per channel: (..., d) -> (..., d), before rounding."""
        return torch.addcmul(self._neg_offset, torch.tanh(z + self._shift), self._half_l)

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """The bounded, rescaled latent without rounding: the code is its rounding (on the same scale)."""
        return self.bound(z.float()) / self._width

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._flatten(z)  # (M, d)
        # value round(bound(z)) / w, gradient of bound(z) / w (rounding passed straight through)
        quantized, rounded = _BoundRound.apply(flat, self._shift, self._half_l, self._neg_offset, self._width,
                                               self._slope)
        # (M,) mixed radix, exact in float32 below 2**24; a product and a sum, not a mat-vec, which autocast
        # would run in bf16 (8 bits of mantissa)
        idx = torch.add((rounded * self._basis).sum(dim=-1), self._id_offset).long()
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape).to(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=flat.new_zeros(()),
            stats=batch_stats(idx, self._size),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.div(indices.unsqueeze(-1), self._basis_long, rounding_mode="floor") % self._levels
        return (digits.float() - self._width) / self._width

    def code_vectors(self, codebook: int, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def codebooks(self) -> list[torch.Tensor]:
        """The implicit codebook: every point of the level grid, (prod(levels), d), in id order."""
        return [self.lookup(torch.arange(self._size, device=self._basis.device))]

    def init_codebook(self, vectors: torch.Tensor) -> None:
        raise QuantizerConfigError(
            "quantizer: fsq has an implicit codebook (its level grid), so there is nothing to k-means-initialise; "
            "use schedule.init=random, or schedule.mode=deferred (continuous phase, then quantization is switched on)"
        )
