"""Adaptive dynamic quantization (Chen et al. 2024, arXiv 2407.04939).

A ladder of EMA codebooks of equal capacity W = N_i * D_i, each behind its own projections
C -> D_i -> quantize -> D_i -> C, and a selector (multi-head attention between a query from the encoder
output and one learned key per codebook) whose scores pass through a hard Gumbel-softmax that picks the
codebook for each *selection unit*. Token ids live in one joint vocabulary: codebook i's code j has id
``codebook_offsets[i] + j``.

Two selectors share this class; four options choose between them (all in ``AdaptiveConfig``):

================== ============================== =================================================
option             vqgen default                  the authors' code (``gumbel.py``)
================== ============================== =================================================
selector_logits    ``scores``: scaled dot products ``attention_probs``: the head-averaged attention
                   of query and keys, averaged     *probabilities* of ``nn.MultiheadAttention(C, 2)``
                   over heads, used as logits      (values in [0, 1]) passed to ``gumbel_softmax`` as
                                                   logits, so even a confident selector picks its
                                                   codebook with probability <= e / (e + K - 1)
granularity        ``image`` (mean-pooled latent)  ``view``: the rows of ``h.view(-1, C)`` over the
                   or ``position``                 NCHW latent, i.e. chunks of C consecutive values of
                                                   the (C, h, w) memory of one image (with C = h * w
                                                   one channel, with C = 2 h w two channels, at every
                                                   position); each row picks its codebook
selector_eval_noise ``false``: argmax at eval     ``true``: Gumbel noise at eval too (tau = 1)
projection         ``linear`` both ways            ``conv``: 1x1 conv down to D_i (identical to a
                                                   Linear on channel-last input) and a 3x3 conv back
selector_heads     4                               2
tau schedule       linear ``selector_tau_start``   ``tau = (20000 - m) + 1`` at step m: linear from
                   -> ``selector_tau_end`` over    ~2e4 to 1 over the run (set ``selector_tau_steps``
                   ``selector_tau_steps``          to the run's quantized steps: the schedule counts
                                                   optimizer steps of the quantized phase only)
================== ============================== =================================================

Deliberate differences from the authors' code in both settings: the EMA codebooks start from the
Sonnet-style state of ``EMAQuantizer`` (their ``N_k = 0`` with an independent random ``embed_avg`` makes
codes unused at the first step blow up and never return) and are meant to be k-means initialised
(``init_codebook``) like every other quantizer of a study.

With a hard Gumbel forward the chosen codebook is ``argmax(logits + noise)`` whatever tau is; tau only
scales the selector's straight-through gradient by 1 / tau. ``selector_parameters()`` lets the trainer
log that gradient's norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layout import codebook_of
from ..stats import batch_stats
from .base import (
    CommitmentOptions,
    DeadCodeOptions,
    DecayOptions,
    KMeansOptions,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    SmoothingOptions,
    check_schedule,
)
from .ema import EMAConfig, EMAQuantizer
from .gumbel import gumbel_softmax
from .registry import Capabilities, register_quantizer


def linear_tau(step: torch.Tensor, start: float, end: float, steps: int) -> torch.Tensor:
    """``start + (end - start) * min(step / steps, 1)`` as a 0-dim float tensor (no host sync)."""
    frac = (step.float() / steps).clamp(max=1.0)
    return start + (end - start) * frac


def one_hot_of(choice: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(...,) int64 -> (..., num_classes) float one-hot, by scatter (F.one_hot's range check syncs)."""
    return torch.zeros(*choice.shape, num_classes, device=choice.device).scatter_(-1, choice.unsqueeze(-1), 1.0)


GRANULARITIES = ("image", "position", "view")
SELECTOR_LOGITS = ("scores", "attention_probs")
PROJECTIONS = ("linear", "conv")


@dataclass
class AdaptiveConfig(KMeansOptions, DeadCodeOptions, SmoothingOptions, DecayOptions, CommitmentOptions,
                     QuantizerConfig):
    """``adaptive``: codebook i of the ladder holds ``capacity // ladder_dims[i]`` codes of width ``ladder_dims[i]``
    (an EMA codebook each, with the shared options above); ``dim`` is the latent width before the per-codebook
    projections. The selector's temperature anneals linearly, as the authors' code does,
    ``tau = selector_tau_start + (selector_tau_end - selector_tau_start) * min(t / selector_tau_steps, 1)``
    over the optimizer steps ``t`` of the quantized phase (2e4 -> 1)."""

    kind: str = "adaptive"
    capacity: int = 65536  # W = N_i * D_i for every codebook
    ladder_dims: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 8, 4, 2, 1])
    granularity: str = "image"  # one codebook per "image", per "position", or per "view" row (authors')
    selector_heads: int = 4  # attention heads of the selector (must divide dim)
    selector_logits: str = "scores"  # "scores" (scaled dot products) | "attention_probs" (authors')
    selector_eval_noise: bool = False  # Gumbel noise at eval too (authors' code), else argmax
    projection: str = "linear"  # "linear" both ways | "conv" (1x1 down, 3x3 back, authors')
    selector_tau_start: float = 2e4
    selector_tau_end: float = 1.0
    selector_tau_steps: int = 20000  # optimizer steps of the quantized phase (deferred: steps - ae_steps)

    def ladder(self) -> list[tuple[int, int]]:
        """The ladder as (N_i, D_i) pairs with N_i * D_i == capacity."""
        return [(self.capacity // d, d) for d in self.ladder_dims]

    def check(self, fail) -> None:
        if self.granularity not in GRANULARITIES:
            fail(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.selector_logits not in SELECTOR_LOGITS:
            fail(f"selector_logits must be one of {', '.join(SELECTOR_LOGITS)}, got {self.selector_logits!r}")
        if self.projection not in PROJECTIONS:
            fail(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        check_schedule(fail, "selector_tau", self.selector_tau_start, self.selector_tau_end, self.selector_tau_steps)
        if self.capacity < 1:
            fail(f"capacity must be >= 1, got {self.capacity}")
        if not self.ladder_dims:
            fail("ladder_dims must list at least one codebook width, e.g. [128, 64, 32, 16, 8, 4, 2, 1]")
        for d in self.ladder_dims:
            if d < 1 or self.capacity % d:
                fail(
                    f"ladder_dims entry {d} does not divide capacity {self.capacity}; every codebook must hold "
                    "capacity // D codes of width D exactly (use divisors of the capacity)"
                )
            if self.capacity // d < 2:
                fail(f"ladder_dims entry {d} leaves capacity // {d} = {self.capacity // d} code; every codebook needs >= 2")
        if len(set(self.ladder_dims)) != len(self.ladder_dims):
            fail(f"ladder_dims must not repeat a width, got {self.ladder_dims}")
        if self.selector_heads < 1 or self.dim % self.selector_heads:
            fail(f"selector_heads ({self.selector_heads}) must be >= 1 and divide dim ({self.dim})")


@register_quantizer(
    "adaptive",
    config=AdaptiveConfig,
    capabilities=Capabilities(learned_codebook=True, kmeans_init=True, dead_code_reset=True, codebook_selection=True),
)
class AdaptiveQuantizer(Quantizer):
    """Selects one codebook of the (N_i, D_i) ladder per selection unit (image, position or view row).

    Training: every codebook quantizes every input (the selector's gradient needs all outputs, and every
    EMA codebook is updated); the output is ``sum_i w_i * proj_out_i(q_i)`` per unit with the hard
    Gumbel one-hot ``w`` at temperature ``tau`` (linear schedule over optimizer steps); loss = mean of
    the per-codebook commitment losses. Eval: argmax selection (or Gumbel noise at tau 1 with
    ``selector_eval_noise``); for ``image``/``position`` only the selected codebook quantizes each input.

    Input ``z`` is channel-last (B, ..., C); ``granularity='view'`` and ``projection='conv'`` need the
    VQ-VAE's (B, h, w, C).
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        ladder = cfg.ladder()  # [(N_i, D_i)]
        c = cfg.dim
        self.proj_in = nn.ModuleList(nn.Linear(c, d) for _, d in ladder)  # 1x1 conv == Linear, channel-last
        if cfg.projection == "conv":
            self.proj_out = nn.ModuleList(nn.Conv2d(d, c, 3, padding=1) for _, d in ladder)
        else:
            self.proj_out = nn.ModuleList(nn.Linear(d, c) for _, d in ladder)
        self.quantizers = nn.ModuleList(
            EMAQuantizer(cfg.options(EMAConfig, codebook_size=n, dim=d, kmeans_seed=cfg.kmeans_seed + i))
            for i, (n, d) in enumerate(ladder)
        )
        self.num_heads = cfg.selector_heads
        if cfg.selector_logits == "attention_probs":
            self.attention = nn.MultiheadAttention(c, cfg.selector_heads, batch_first=True)
        else:
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

    @property
    def per_image_codebook(self) -> bool:
        return self.config.granularity == "image"

    def schedule(self) -> tuple[str, int]:
        return "selector_tau_steps", self.config.selector_tau_steps

    def tau_at(self, step: int) -> float:
        cfg = self.config
        return float(linear_tau(torch.tensor(step), cfg.selector_tau_start, cfg.selector_tau_end, cfg.selector_tau_steps))

    def tau(self) -> torch.Tensor:
        """Current selector temperature, a pure function of ``num_steps``."""
        cfg = self.config
        return linear_tau(self.num_steps, cfg.selector_tau_start, cfg.selector_tau_end, cfg.selector_tau_steps)

    def selector_parameters(self) -> list[nn.Parameter]:
        """The parameters only the selector's gradient reaches (for logging its norm)."""
        head = self.attention if self.config.selector_logits == "attention_probs" else self.query
        return [self.keys, *head.parameters()]

    # ------------------------------------------------------------------ selection units
    def _units(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position vectors (B, L, C) -> the selection units' vectors (B, U, C).

        ``image``: the mean over positions (U = 1); ``position``: the positions (U = L); ``view``: the rows
        of ``h.view(-1, C)`` of the NCHW latent, i.e. (B, C, L) memory cut into L rows of C values.
        """
        granularity = self.config.granularity
        if granularity == "image":
            return x.mean(dim=1, keepdim=True)
        if granularity == "position":
            return x
        b, length, c = x.shape
        return x.transpose(1, 2).reshape(b, length, c)  # (B, C, L) contiguous -> rows of C values

    def _from_view(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of the ``view`` cut: (B, L, C) rows -> per-position vectors (B, L, C)."""
        b, length, c = rows.shape
        return rows.reshape(b, c, length).transpose(1, 2)

    def selector_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of the codebooks for every unit: (B, L, C) -> (B, U, K_cb)."""
        units = self._units(x)  # (B, U, C)
        if self.config.selector_logits == "attention_probs":
            keys = self.keys.unsqueeze(0).expand(units.shape[0], -1, -1)  # (B, K_cb, C)
            _, probs = self.attention(units, keys, keys, need_weights=True, average_attn_weights=True)
            return probs  # (B, U, K_cb) head-averaged attention probabilities, used as logits
        head_dim = self.dim // self.num_heads
        q = self.query(units).unflatten(-1, (self.num_heads, head_dim))  # (B, U, H, dh)
        k = self.keys.unflatten(-1, (self.num_heads, head_dim))  # (K_cb, H, dh)
        scores = torch.einsum("buhd,khd->buhk", q, k) / math.sqrt(head_dim)  # (B, U, H, K_cb)
        return scores.mean(dim=-2)

    def select(self, x: torch.Tensor, force: int | None = None) -> torch.Tensor:
        """One-hot selection weights (B, U, K_cb) for per-position vectors ``x`` (B, L, C).

        Training: hard Gumbel-softmax at ``tau`` (straight-through gradient). Eval: argmax, or a Gumbel
        sample when ``selector_eval_noise``. ``force=i`` selects codebook i everywhere (no gradient).
        """
        if force is not None:
            shape = (x.shape[0], 1 if self.config.granularity == "image" else x.shape[1])
            return one_hot_of(torch.full(shape, force, dtype=torch.int64, device=x.device), self.num_codebooks)
        logits = self.selector_logits(x).float()  # (B, U, K_cb)
        if self.training:
            return gumbel_softmax(logits, self.tau(), hard=True)
        if self.config.selector_eval_noise:
            return gumbel_softmax(logits, torch.ones((), device=logits.device), hard=True).detach()
        return one_hot_of(logits.argmax(dim=-1), self.num_codebooks)

    def position_weights(self, weights: torch.Tensor, length: int) -> torch.Tensor:
        """Unit weights (B, U, K_cb) -> the share of each codebook in each position's vector (B, L, K_cb).

        ``image``/``position``: the unit's one-hot; ``view``: the fraction of the position's C channels
        whose row chose each codebook.
        """
        granularity = self.config.granularity
        if granularity == "image":
            return weights.expand(-1, length, -1)
        if granularity == "position":
            return weights
        b, _, k = weights.shape
        c = self.dim
        # value (channel ch, position p) sits at offset ch * L + p of the image's (C, L) memory: row // C
        row_of = (torch.arange(c, device=weights.device)[:, None] * length
                  + torch.arange(length, device=weights.device)[None, :]) // c  # (C, L)
        per_value = weights.detach()[:, row_of.reshape(-1)].reshape(b, c, length, k)  # (B, C, L, K_cb)
        return per_value.mean(dim=1)

    # ------------------------------------------------------------------ quantization
    def _project_out(self, i: int, q: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """Codebook i's codes (M, D_i) -> (M, C); a 3x3 conv needs the (B, h, w) layout ``spatial``."""
        p_out = self.proj_out[i]
        if isinstance(p_out, nn.Conv2d):
            # without a (B, h, w) layout every code stands alone: a 1x1 grid (zero-padded neighbours)
            layout = spatial if len(spatial) == 3 else (q.shape[0], 1, 1)
            grid = q.reshape(*layout, q.shape[-1]).permute(0, 3, 1, 2)  # (B, D_i, h, w)
            return p_out(grid).permute(0, 2, 3, 1).reshape(-1, self.dim)
        return p_out(q)

    def _combine(self, outputs: list[torch.Tensor], weights: torch.Tensor, b: int) -> torch.Tensor:
        """sum_i w_i * output_i per unit: outputs [(M, C)], weights (B, U, K_cb) -> (M, C)."""
        granularity = self.config.granularity
        out = None
        for i, o in enumerate(outputs):
            x = o.reshape(b, -1, self.dim)  # (B, L, C)
            if granularity == "view":
                x = self._units(x)  # (B, L, C) rows
            term = weights[..., i : i + 1] * x  # (B, U, 1) * (B, L, C)
            out = term if out is None else out + term
        if granularity == "view":
            out = self._from_view(out)
        return out.reshape(-1, self.dim)

    def _all_codebooks(self, flat: torch.Tensor, spatial: tuple[int, ...]):
        """Every codebook on every input: flat (M, C) -> outputs [(M, C)], ids (M, K_cb) joint, losses [()]."""
        outputs, ids, losses = [], [], []
        for i, (p_in, vq) in enumerate(zip(self.proj_in, self.quantizers)):
            q = vq(p_in(flat))  # codes of width D_i; EMA-updated in training
            outputs.append(self._project_out(i, q.quantized, spatial).to(flat.dtype))
            ids.append(q.indices + self.codebook_offsets[i])
            losses.append(q.loss)
        return outputs, torch.stack(ids, dim=1), losses

    def _token_choice(self, weights: torch.Tensor, length: int) -> torch.Tensor:
        """Which codebook's id stands for each position in ``indices``: (B, L) int64.

        ``image``/``position``: the selected one. ``view`` mixes codebooks within a position; the token
        grid then shows the image's most selected codebook (the decoder saw more than these tokens).
        """
        if self.config.granularity == "view":
            return weights.detach().sum(dim=1).argmax(dim=-1, keepdim=True).expand(-1, length)
        return self.position_weights(weights, length).detach().argmax(dim=-1)

    def forward(self, z: torch.Tensor, force: int | None = None) -> QuantizerOutput:
        """Quantize ``z`` (B, ..., C); ``force=i`` (eval analysis) uses codebook i for every unit."""
        flat = self._flatten(z)  # (M, C)
        b = z.shape[0]
        x = flat.reshape(b, -1, self.dim)  # (B, L, C)
        length = x.shape[1]
        spatial = tuple(z.shape[:-1])
        weights = self.select(x, force)  # (B, U, K_cb)
        tau = self.tau()
        choice = self._token_choice(weights, length).reshape(-1)  # (M,)
        if self.training or self.config.granularity == "view" or isinstance(self.proj_out[0], nn.Conv2d):
            outputs, ids, losses = self._all_codebooks(flat, spatial)
            quantized = self._combine(outputs, weights, b)
            indices = ids.gather(1, choice[:, None]).squeeze(1)  # (M,) joint ids
            share = weights.detach().mean(dim=(0, 1))  # (K_cb,) fraction of units per codebook
            loss = torch.stack(losses).mean() if self.training else (torch.stack(losses) * share).sum()
        else:
            quantized, indices, loss = self._selected_only(flat, choice)
        stats = batch_stats(indices, self.codebook_size)
        stats["tau"] = tau
        stats["selection"] = weights.detach().mean(dim=(0, 1))  # (K_cb,) fraction of units per codebook
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape).to(z.dtype),
            indices=indices.reshape(z.shape[:-1]),
            loss=loss,
            stats=stats,
        )

    def _selected_only(self, flat: torch.Tensor, choice: torch.Tensor):
        """Eval with per-position choices and linear projections: only the selected codebook per position.

        flat (M, C), choice (M,) -> (M, C), (M,), loss. Finding each codebook's rows syncs with the host,
        which is fine outside training.
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

    @torch.no_grad()
    def analyse(self, z: torch.Tensor, force: int | None = None) -> dict[str, torch.Tensor]:
        """Everything an evaluation needs from one eval-mode selection of ``z`` (B, h, w, C).

        Returns ``quantized`` (B, h, w, C) (what the decoder gets; the same as ``forward`` would give for
        this selection), ``unit_choice`` (B, U) chosen codebook per unit, ``ids`` (B, h, w, K_cb) every
        codebook's local code id at every position, and ``share`` (B, h, w, K_cb) the fraction of each
        position's vector that comes from each codebook (one-hot unless ``granularity='view'``).
        """
        flat = self._flatten(z)
        b = z.shape[0]
        x = flat.reshape(b, -1, self.dim)
        weights = self.select(x, force)  # (B, U, K_cb)
        outputs, ids, _ = self._all_codebooks(flat, tuple(z.shape[:-1]))
        local = ids - self._offsets  # (M, K_cb) ids within each codebook
        return {
            "quantized": self._combine(outputs, weights, b).reshape(z.shape),
            "unit_choice": weights.argmax(dim=-1),
            "ids": local.reshape(*z.shape[:-1], self.num_codebooks),
            "share": self.position_weights(weights, x.shape[1]).reshape(*z.shape[:-1], self.num_codebooks),
        }

    def codebook_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Joint ids (any shape) -> which codebook each belongs to (same shape, int64)."""
        return codebook_of(indices, ends=self._ends)

    def codebook_inputs(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """What each codebook quantizes: the inputs (M, C) through its own projection, [(M, D_i)]."""
        return [p_in(flat) for p_in in self.proj_in]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Joint ids (B, ...) -> back-projected codes (B, ..., C); each id uses its own codebook.

        With ``projection='conv'`` a (B, h, w) id grid is back-projected as a whole (the 3x3 conv mixes
        neighbouring positions: exact for ``granularity='image'``, where a whole grid uses one codebook);
        ids of any other shape are back-projected one by one, each code alone on a 1x1 grid.
        """
        ids = indices.reshape(-1)  # (M,)
        which = self.codebook_of(ids)  # (M,)
        out = torch.zeros(ids.shape[0], self.dim, device=ids.device)
        for i, vq in enumerate(self.quantizers):
            local = (ids - self.codebook_offsets[i]).clamp(0, vq.config.codebook_size - 1)
            projected = self._project_out(i, vq.lookup(local), tuple(indices.shape))
            out = torch.where((which == i).unsqueeze(1), projected, out)
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
