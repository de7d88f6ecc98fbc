"""The quantizer interface: one flat config, one output type, one base class, one factory.

Every quantizer takes channel-last input ``z`` of shape (B, ..., dim) and returns a ``QuantizerOutput``.
Quantizers with a single learned codebook (``vq``, ``ema``, ``gumbel``) share the dead-code reset
implemented here; ``adaptive`` holds one ``ema`` quantizer per codebook of its ladder. Kinds register
themselves (``registry.register_quantizer``) with the config fields they read and their capabilities;
this module never imports them, ``build_quantizer`` looks them up.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from vqgen.core.config import ConfigError
from vqgen.core.distributed import all_gather_cat, all_reduce_, broadcast_, rank
from ..stats import code_counts
from .registry import Capabilities, QuantizerSpec, kinds_using, registered_kinds, spec_of

GRANULARITIES = ("image", "position", "view")
SELECTOR_LOGITS = ("scores", "attention_probs")
PROJECTIONS = ("linear", "conv")
MAX_IMPLICIT_CODES = 2**20  # fsq / lfq: the prior's vocabulary and every histogram hold one entry per code


def _show(value) -> str:
    """A config value as it is written in YAML / key=value overrides (true, [8, 5, 5], 0.25)."""
    return json.dumps(value) if isinstance(value, (bool, list)) or value is None else str(value)


class QuantizerConfigError(ConfigError):
    """A quantizer configuration that cannot work; the message names the field and what to change."""


@dataclass
class QuantizerConfig:
    """Settings of every quantizer kind in one flat dataclass.

    Each kind reads some of the fields (its registration lists them, see ``registry.py``); a field the kind
    does not read must keep its default, so a setting that would be silently ignored is an error instead.
    (A field written with its default value cannot be told apart from one left out.)

    Temperature schedules advance with the number of optimizer steps ``t`` (a ``num_steps`` buffer that the
    trainer advances once per update with ``Quantizer.step_schedule()``, so gradient accumulation and extra
    forward passes do not move it):
    ``gumbel`` anneals exponentially, ``tau = tau_start * (tau_end / tau_start) ** min(t / tau_anneal_steps, 1)``
    (1 -> 1/16 as in VQGAN's Gumbel model); ``adaptive``'s selector anneals linearly, as the authors' code does,
    ``tau = selector_tau_start + (selector_tau_end - selector_tau_start) * min(t / selector_tau_steps, 1)``
    (2e4 -> 1 over 20k steps). For ``adaptive`` the vocabulary comes from ``capacity`` and ``ladder_dims``
    (codebook i has capacity // ladder_dims[i] codes of width ladder_dims[i]); ``dim`` is the latent width
    before the per-codebook projections. For ``fsq`` the vocabulary is ``prod(levels)`` and ``dim`` equals
    ``len(levels)``; for ``lfq`` it is ``codebook_size = 2 ** dim``.
    """

    kind: str = "ema"  # "vq" | "ema" | "gumbel" | "adaptive" | "fsq" | "lfq" | "simvq"
    codebook_size: int = 512
    dim: int = 64
    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # EMA decay (ema, adaptive; usage tracking for dead codes)
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    cosine: bool = False  # vq only: l2-normalised inputs and codes
    rotation_trick: bool = False  # vq, ema, simvq: gradient through the rotation-and-rescale map (Fifty et al.)
    kl_weight: float = 5e-4  # gumbel: weight of KL(q || uniform)
    straight_through: bool = False  # gumbel: hard one-hot samples with straight-through gradients
    tau_start: float = 1.0  # gumbel temperature schedule (exponential)
    tau_end: float = 0.0625
    tau_anneal_steps: int = 10000
    capacity: int = 65536  # adaptive: W = N_i * D_i for every codebook
    ladder_dims: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 8, 4, 2, 1])
    granularity: str = "image"  # adaptive: one codebook per "image", per "position", or per "view" row (authors')
    selector_heads: int = 4  # adaptive: attention heads of the selector (must divide dim)
    selector_logits: str = "scores"  # adaptive: "scores" (scaled dot products) | "attention_probs" (authors')
    selector_eval_noise: bool = False  # adaptive: Gumbel noise at eval too (authors' code), else argmax
    projection: str = "linear"  # adaptive: "linear" both ways | "conv" (1x1 down, 3x3 back, authors')
    selector_tau_start: float = 2e4  # adaptive selector temperature schedule (linear)
    selector_tau_end: float = 1.0
    selector_tau_steps: int = 20000  # optimizer steps of the quantized phase (deferred: steps - ae_steps)
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq: values per latent channel (paper: 2^10)
    entropy_weight: float = 0.1  # lfq: weight of the entropy penalty (MAGVIT-v2)
    entropy_gamma: float = 1.0  # lfq: weight of the codebook-entropy term inside the penalty
    entropy_temperature: float = 0.01  # lfq: temperature of the soft assignment the entropies are taken of
    dead_code_threshold: float = 0.0  # 0 = off; codes whose EMA usage count is below this are re-seeded
    # false: the threshold is an EMA count; true: a fraction of the uniform share (sum of counts / codes), the
    # same rule for codebooks of any size (with 2,048 inputs per step and 512 codes, 0.25 equals a count of 1)
    dead_code_relative: bool = False
    dead_code_window: int = 100  # training steps between dead-code checks
    kmeans_iters: int = 10  # Lloyd iterations of init_codebook
    kmeans_seed: int = 0

    def spec(self) -> QuantizerSpec:
        """The registration of ``kind`` (raises ``QuantizerConfigError`` for an unknown kind)."""
        spec = spec_of(self.kind)
        if spec is None:
            raise QuantizerConfigError(
                f"quantizer: unknown kind {self.kind!r}; choose one of {', '.join(registered_kinds())}"
            )
        return spec

    def validate(self) -> None:
        """Raise ``QuantizerConfigError`` naming the first field that cannot work."""

        def fail(message: str) -> None:
            raise QuantizerConfigError(f"quantizer: {message}")

        spec = self.spec()
        for f in dataclasses.fields(self):
            if f.name == "kind" or f.name in spec.fields:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = getattr(self, f.name)
            if value != default:
                users = kinds_using(f.name)
                fail(
                    f"{f.name}={_show(value)} is not an option of kind {self.kind!r}, which would ignore it; remove "
                    f"it or set it back to its default ({f.name}={_show(default)})"
                    + (f", or use a kind that reads it ({', '.join(users)})" if users else "")
                )
        if self.dim < 1:
            fail(f"dim must be >= 1, got {self.dim}")
        if self.codebook_size < 2:
            fail(f"codebook_size must be >= 2 (a single code carries no information), got {self.codebook_size}")
        if self.beta < 0:
            fail(f"beta (commitment weight) must be >= 0, got {self.beta}")
        if not 0.0 < self.decay < 1.0:
            fail(f"decay must lie strictly between 0 and 1 (e.g. 0.99), got {self.decay}")
        if self.eps <= 0:
            fail(f"eps must be > 0 (e.g. 1e-5), got {self.eps}")
        if self.cosine and self.dim < 2:
            fail("cosine=true needs dim >= 2 (a normalised 1-d code is just a sign)")
        if self.kl_weight < 0:
            fail(f"kl_weight must be >= 0, got {self.kl_weight}")
        for prefix, start, end, steps in (
            ("tau", self.tau_start, self.tau_end, self.tau_anneal_steps),
            ("selector_tau", self.selector_tau_start, self.selector_tau_end, self.selector_tau_steps),
        ):
            if start <= 0 or end <= 0:
                fail(f"{prefix}_start and {prefix}_end must be > 0, got {start} and {end}")
            if end > start:
                fail(f"{prefix}_end ({end}) must not exceed {prefix}_start ({start}); the temperature anneals downwards")
        if self.tau_anneal_steps < 1 or self.selector_tau_steps < 1:
            fail("tau_anneal_steps and selector_tau_steps must be >= 1")
        if self.granularity not in GRANULARITIES:
            fail(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.selector_logits not in SELECTOR_LOGITS:
            fail(f"selector_logits must be one of {', '.join(SELECTOR_LOGITS)}, got {self.selector_logits!r}")
        if self.projection not in PROJECTIONS:
            fail(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.entropy_weight < 0 or self.entropy_gamma < 0 or self.entropy_temperature <= 0:
            fail("entropy_weight and entropy_gamma must be >= 0 and entropy_temperature > 0, got "
                 f"{self.entropy_weight}, {self.entropy_gamma} and {self.entropy_temperature}")
        if self.dead_code_threshold < 0:
            fail(f"dead_code_threshold must be >= 0 (0 turns the reset off), got {self.dead_code_threshold}")
        if self.dead_code_relative and not self.dead_code_threshold:
            fail("dead_code_relative=true needs dead_code_threshold > 0 (e.g. 0.25 of the uniform share)")
        if self.dead_code_window < 1:
            fail(f"dead_code_window must be >= 1 step, got {self.dead_code_window}")
        if self.kmeans_iters < 0:
            fail(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if spec.validate is not None:
            spec.validate(self, fail)

    def ladder(self) -> list[tuple[int, int]]:
        """The adaptive ladder as (N_i, D_i) pairs with N_i * D_i == capacity."""
        return [(self.capacity // d, d) for d in self.ladder_dims]

    @staticmethod
    def drop_unread(data: dict) -> dict:
        """A saved quantizer config (a dict) without the fields its kind does not read.

        Those fields were ignored when the model was built, so dropping them (their defaults take their place)
        loads the same model; tokenizers saved before unread fields were refused keep loading. An unknown kind
        is left for validation to report.
        """
        spec = spec_of(data.get("kind", QuantizerConfig.kind))
        if spec is None:
            return dict(data)
        return {k: v for k, v in data.items() if k == "kind" or k in spec.fields or k not in _FIELD_NAMES}

    def only(self, kind: str, **values) -> "QuantizerConfig":
        """A config of ``kind`` with ``values`` and this config's settings of the fields ``kind`` reads.

        Every other field is at its default, so the result validates as ``kind`` (``adaptive`` builds its
        inner ``ema`` codebooks this way).
        """
        spec = QuantizerConfig(kind=kind).spec()
        kept = {name: getattr(self, name) for name in spec.fields if name not in values}
        return QuantizerConfig(kind=kind, **kept, **values)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(QuantizerConfig))


class _StraightThrough(torch.autograd.Function):
    """Forward: the codes ``q``; backward: the gradient goes to ``x`` unchanged (and none to ``q``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x + sg(q - x)`` without the two elementwise passes: the value of ``q``, the gradient of ``x``."""
    return _StraightThrough.apply(x, q.detach())


ROTATION_EPS = 1e-6  # guards the norms of the rotation trick against an input or code at the origin


class _RotationTrick(torch.autograd.Function):
    """Forward: the codes ``q`` (M, D); backward: ``dL/dx = lambda R^T g`` (Fifty et al. 2024).

    ``R`` is the rotation of the plane of ``x`` and ``q`` that takes ``x_hat = x / |x|`` to ``q_hat = q / |q|``
    and ``lambda = |q| / |x|``, so ``sg(lambda R) x = q`` (the forward value of straight-through). With
    ``r = (x_hat + q_hat) / |x_hat + q_hat|``, ``R = I - 2 r r^T + 2 q_hat x_hat^T``, hence
    ``R^T g = g - 2 r (r . g) + 2 x_hat (q_hat . g)``: three row-wise dot products, never a (D, D) matrix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, q)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q = ctx.saved_tensors
        x_norm = x.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)  # (M, 1)
        q_norm = q.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)
        x_hat, q_hat = x / x_norm, q / q_norm  # (M, D)
        r = x_hat + q_hat
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)
        g = grad.to(x.dtype)
        rg = (r * g).sum(dim=-1, keepdim=True)  # (M, 1)
        qg = (q_hat * g).sum(dim=-1, keepdim=True)
        out = (q_norm / x_norm) * (g - 2.0 * rg * r + 2.0 * qg * x_hat)
        return out.to(grad.dtype), None


def rotation_trick(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The value of ``q`` (M, D); the gradient reaches ``x`` (M, D) rotated and rescaled, none reaches ``q``."""
    return _RotationTrick.apply(x, q.detach())


def pass_gradient(x: torch.Tensor, q: torch.Tensor, rotation: bool) -> torch.Tensor:
    """The quantized output: ``q``'s value with the rotation trick's or straight-through's gradient to ``x``."""
    return rotation_trick(x, q) if rotation else straight_through(x, q)


@dataclass
class QuantizerOutput:
    """What every quantizer returns (see docs/architecture.md)."""

    quantized: torch.Tensor  # (B, ..., dim) to the decoder (straight-through where applicable)
    indices: torch.Tensor  # (B, ...) int64 code ids (joint ids for adaptive)
    loss: torch.Tensor  # scalar, added to the reconstruction loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # batch statistics, device tensors


class Quantizer(nn.Module):
    """Base class: input checks and flattening; subclasses implement the abstract members below.

    ``spec`` (set by ``register_quantizer``) holds the kind's name, config fields and ``Capabilities``.
    """

    spec: QuantizerSpec

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.config = cfg
        self.dim = cfg.dim

    @property
    def capabilities(self) -> Capabilities:
        """What this kind can do (k-means init, learned codebook, dead-code reset, codebook selection)."""
        return self.spec.capabilities

    @property
    def per_image_codebook(self) -> bool:
        """Whether every image's tokens come from one codebook chosen per image (then the prior predicts it)."""
        return False

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """The continuous counterpart of the output for ``z`` (B, ..., dim): what the decoder gets in the
        continuous phase of deferred quantization, and the space the codes are compared with in diagnostics.

        The identity for codebook kinds; ``fsq`` bounds without rounding, ``lfq`` squashes with tanh.
        """
        return z

    def codebook_inputs(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The vectors each codebook quantizes, for inputs ``flat`` (M, dim): [(M, D_i)] (in code space)."""
        return [self.continuous(flat)]

    def code_vectors(self, codebook: int, ids: torch.Tensor) -> torch.Tensor:
        """Codes (n, D_i) of local ids (n,) of codebook ``codebook``, as the diagnostics compare them."""
        return self.codebooks()[codebook][ids]

    def selector_parameters(self) -> list[nn.Parameter]:
        """Parameters only a codebook selector's gradient reaches (empty without one)."""
        return []

    @torch.no_grad()
    def analyse(self, z: torch.Tensor, force: int | None = None) -> dict[str, torch.Tensor]:
        """Everything an evaluation needs from one eval-mode pass of ``z`` (B, ..., dim).

        ``quantized`` (B, ..., dim), ``unit_choice`` (B, U) the codebook of each selection unit, ``ids``
        (B, ..., K_cb) every codebook's local code id at every position and ``share`` (B, ..., K_cb) the
        fraction of each position's vector that comes from each codebook. With a single codebook: U = 1,
        K_cb = 1, choice 0, share 1. ``force=i`` (several codebooks only) makes codebook i quantize everything.
        """
        if force not in (None, 0):
            raise ValueError(f"{type(self).__name__} has one codebook; force={force} names another")
        out = self(z)
        ids = out.indices.unsqueeze(-1)
        return {
            "quantized": out.quantized,
            "unit_choice": torch.zeros(z.shape[0], 1, dtype=torch.int64, device=z.device),
            "ids": ids,
            "share": torch.ones_like(ids, dtype=torch.float32),
        }

    @property
    def codebook_sizes(self) -> list[int]:
        """Number of codes of each codebook."""
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        """Total vocabulary (sum over codebooks)."""
        return sum(self.codebook_sizes)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Code ids (B, ...) -> codes (B, ..., dim)."""
        raise NotImplementedError

    def init_codebook(self, vectors: torch.Tensor) -> None:  # pragma: no cover - abstract
        """k-means initialisation from ``vectors`` (M, dim) (gathered across processes, rank 0, broadcast)."""
        raise NotImplementedError

    def codebooks(self) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """The codebooks as (N_i, D_i) tensors (detached)."""
        raise NotImplementedError

    def schedule(self) -> tuple[str, int] | None:
        """(config field, length in optimizer steps) of the temperature schedule; None without one."""
        return None

    def tau_at(self, step: int) -> float | None:
        """The temperature after ``step`` optimizer steps of the quantized phase (None without a schedule)."""
        return None

    @torch.no_grad()
    def step_schedule(self) -> None:
        """Advance the temperature schedule by one optimizer step (no-op for quantizers without one).

        Trainers call it once per optimizer update, so the schedule counts updates, not forward passes
        (gradient accumulation or a second forward do not move it). An in-place add on the device: no sync.
        """
        num_steps = getattr(self, "num_steps", None)
        if isinstance(num_steps, torch.Tensor):
            num_steps.add_(1)

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        """(B, ..., dim) -> (M, dim) float32 with a clear error for a wrong last axis."""
        if z.dim() < 2 or z.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects channel-last input (B, ..., {self.dim}), got {tuple(z.shape)}; "
                "check quantizer.dim against the encoder output"
            )
        return z.reshape(-1, self.dim).float()

    def _check_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Validate init_codebook input -> (M, dim) float32."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or vectors.shape[0] < 1:
            raise ValueError(
                f"init_codebook expects vectors of shape (M, {self.dim}) with M >= 1, got {tuple(vectors.shape)}"
            )
        return vectors.detach().float()


class SingleCodebookQuantizer(Quantizer):
    """Shared bookkeeping of quantizers with one codebook: usage tracking and dead-code reset.

    With ``dead_code_threshold > 0`` every ``dead_code_window`` training forward passes the codes whose
    EMA usage count (decay ``decay``, counts summed over processes) is below the threshold are re-seeded
    from the current batch's inputs gathered from all processes. With ``dead_code_relative`` the threshold is
    a fraction of the uniform share ``sum(counts) / K`` (a code used a quarter as often as if all codes were
    used equally, for 0.25), so one setting means the same for a codebook of 512 or of 65,536 codes. Rank 0 draws the replacements (with a
    generator seeded by ``kmeans_seed`` and the number of resets so far) and broadcasts the codebook state,
    so every replica holds the same codebook. This check syncs with the host, once per window.

    The window counter and the reset count are Python integers (deciding when to check needs no host
    sync); they travel in the state dict as the buffer ``dead_code_state`` = [forwards since the last
    check, resets so far], written when the state dict is taken and read back when one is loaded, so a
    resumed run checks and re-seeds exactly as an uninterrupted one.
    """

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self._forwards_since_check = 0  # Python counter: no host sync to decide when to check
        self._resets = 0
        if self.dead_code_enabled:
            self.register_buffer("dead_code_state", torch.zeros(2, dtype=torch.int64))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.dead_code_enabled:  # the Python counters into their buffer (once per save, not per step)
            self.dead_code_state.copy_(torch.tensor([self._forwards_since_check, self._resets]))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "dead_code_state"
        if self.dead_code_enabled and key not in state_dict:
            # saved before the counters were recorded: the window starts afresh
            state_dict[key] = torch.zeros(2, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.dead_code_enabled:
            self._forwards_since_check, self._resets = (int(v) for v in self.dead_code_state.tolist())

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size]

    @property
    def dead_code_enabled(self) -> bool:
        """Whether dead-code resets are on."""
        return self.config.dead_code_threshold > 0

    def usage_counts(self) -> torch.Tensor:
        """(K,) EMA usage count of each code (what the dead-code threshold is compared with)."""
        return self.usage_ema

    def _track_usage(self, indices: torch.Tensor) -> None:
        """EMA of code counts over processes; for quantizers without EMA cluster sizes of their own."""
        counts = all_reduce_(code_counts(indices, self.config.codebook_size))
        self.usage_ema.mul_(self.config.decay).add_(counts, alpha=1.0 - self.config.decay)

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a reset may change (broadcast from rank 0 afterwards)."""
        raise NotImplementedError

    def _reseed(self, dead: torch.Tensor, samples: torch.Tensor, count: float) -> None:
        """Give the codes ``dead`` (n,) int64 the new values ``samples`` (n, dim) and the usage count ``count``."""
        raise NotImplementedError

    def dead_code_level(self, counts: torch.Tensor) -> float:
        """The EMA usage count below which a code is dead: the threshold, or its share of ``sum(counts) / K``."""
        threshold = self.config.dead_code_threshold
        if self.config.dead_code_relative:
            threshold *= float(counts.sum()) / counts.numel()
        return threshold

    @torch.no_grad()
    def _maybe_reset_dead_codes(self, flat: torch.Tensor) -> None:
        """Called after every training forward with this batch's inputs ``flat`` (M, dim)."""
        if not self.dead_code_enabled:
            return
        self._forwards_since_check += 1
        if self._forwards_since_check < self.config.dead_code_window:
            return
        self._forwards_since_check = 0
        self.reset_dead_codes(flat)

    @torch.no_grad()
    def reset_dead_codes(self, recent: torch.Tensor) -> int:
        """Re-seed the codes with usage below the threshold from ``recent`` inputs (M, dim) of all processes.

        Every process must call it (collectives). Returns the number of codes re-seeded.
        """
        candidates = all_gather_cat(recent.detach().float().contiguous())  # (sum_r M_r, dim)
        counts = self.usage_counts()  # (K,), identical on every process (summed over them)
        level = self.dead_code_level(counts)
        dead = (counts < level).nonzero().squeeze(1)  # (n,)
        num_dead = torch.tensor([dead.numel()], device=recent.device)
        broadcast_(num_dead, src=0)
        if int(num_dead) == 0:
            return 0
        self._resets += 1  # on every rank, so the recorded state is the same everywhere
        if rank() == 0:
            generator = torch.Generator(device=candidates.device).manual_seed(self.config.kmeans_seed + self._resets)
            n = dead.numel()
            # without replacement while there are enough inputs, otherwise some inputs seed several codes
            if n <= candidates.shape[0]:
                rows = torch.randperm(candidates.shape[0], generator=generator, device=candidates.device)[:n]
            else:
                rows = torch.randint(candidates.shape[0], (n,), generator=generator, device=candidates.device)
            self._reseed(dead, candidates[rows], level)
        for t in self._state_tensors():
            broadcast_(t.data, src=0)
        return int(num_dead)


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    """Validate ``cfg`` and build the registered quantizer of ``cfg.kind``."""
    cfg.validate()
    return cfg.spec().cls(cfg)
