"""The quantizer interface: the config every kind extends, one output type, one base class, one factory.

Every quantizer takes channel-last input ``z`` of shape (B, ..., dim) and returns a ``QuantizerOutput``.
Quantizers with a single learned codebook (``vq``, ``ema``, ``gumbel``) share the dead-code reset
implemented here; ``adaptive`` holds one ``ema`` quantizer per codebook of its ladder. Each kind lives in one
file: its config dataclass (a ``QuantizerConfig`` subclass, built from the option groups below and fields of its
own, with its own ``check``), its class, and its registration (``registry.register_quantizer``) with its
capabilities. This module never imports the kinds; ``build_quantizer`` and ``QuantizerConfig(kind=...)`` look
them up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vqgen.core.config import ConfigError
from vqgen.core.distributed import all_gather_cat, all_reduce_, broadcast_, rank
from ..stats import code_counts
from .registry import Capabilities, QuantizerSpec, kinds_using, registered_kinds, spec_of

MAX_IMPLICIT_CODES = 2**20  # fsq / lfq: the prior's vocabulary and every histogram hold one entry per code


def _show(value) -> str:
    """A config value as it is written in YAML / key=value overrides (true, [8, 5, 5], 0.25)."""
    return json.dumps(value) if isinstance(value, (bool, list)) or value is None else str(value)


class QuantizerConfigError(ConfigError):
    """A quantizer configuration that cannot work; the message names the field and what to change."""


@dataclass
class QuantizerConfig:
    """The settings every kind reads; each kind registers its own subclass with its own fields and checks.

    ``QuantizerConfig(kind="vq", codebook_size=16)`` builds the registered class of ``kind`` (``VQConfig``); so does
    reading ``model.quantizer`` from YAML, ``key=value`` overrides or a saved ``config.json`` (``from_dict``). A
    field of another kind is refused unless it holds that field's default (switching ``kind`` on top of a file
    that sets another kind's field means setting it back); files written before per-kind configs are migrated in
    :meth:`migrate`. A class's ``check(self, fail)`` validates its own fields; ``validate`` runs the ``check`` of
    every class in its MRO, shared option groups (``DeadCodeOptions``, ...) included.

    Temperature schedules advance with the number of optimizer steps ``t`` of the quantized phase (a ``num_steps``
    buffer the trainer advances once per update with ``Quantizer.step_schedule()``).
    """

    kind: str = "ema"
    dim: int = 64  # the latent width the quantizer sees

    def __new__(cls, *args, **kwargs):
        if cls is QuantizerConfig:  # the registered class of the kind asked for
            kind = kwargs.get("kind", QuantizerConfig.kind)
            spec = spec_of(kind)
            if spec is None:
                raise QuantizerConfigError(
                    f"quantizer: unknown kind {kind!r}; choose one of {', '.join(registered_kinds())}")
            cls = spec.config
        return super().__new__(cls)

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
        if not isinstance(self, spec.config):
            fail(f"kind={self.kind!r} takes {spec.config.__name__}, got {type(self).__name__}")
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("check")
            if check is not None:
                check(self, fail)

    def check(self, fail) -> None:
        if self.dim < 1:
            fail(f"dim must be >= 1, got {self.dim}")

    @classmethod
    def __config_resolve__(cls, data: dict, prefix: str = "") -> tuple[type, dict]:
        """(the config class of ``data["kind"]``, ``data`` without other kinds' fields that hold their default)."""
        kind = data.get("kind", QuantizerConfig.kind)
        spec = spec_of(kind) if isinstance(kind, str) else None
        if spec is None:
            raise QuantizerConfigError(
                f"quantizer: unknown kind {kind!r} ({prefix}kind); choose one of {', '.join(registered_kinds())}")
        own = {f.name for f in dataclasses.fields(spec.config)}
        kept = {}
        for key, value in data.items():
            if key in own:
                kept[key] = value
                continue
            users = kinds_using(key)
            if not users:
                kept[key] = value  # unknown to every kind: from_dict names it with the allowed keys
                continue
            default = next(_default_of(f) for f in dataclasses.fields(spec_of(users[0]).config) if f.name == key)
            if value == default:
                continue  # another kind's field at its default: it would be ignored, and says nothing
            raise QuantizerConfigError(
                f"quantizer: {key}={_show(value)} is not an option of kind {kind!r}, which would ignore it; remove it "
                f"or set it back to its default ({key}={_show(default)}), or use a kind that reads it ({', '.join(users)})"
            )
        return spec.config, kept

    @staticmethod
    def migrate(data: dict) -> dict:
        """A quantizer config saved by an older vqgen (one flat config of every kind's fields) as today's: the
        fields its kind does not read are dropped, whatever their value (the model was built without them)."""
        spec = spec_of(data.get("kind", QuantizerConfig.kind))
        if spec is None:
            return dict(data)
        own = {f.name for f in dataclasses.fields(spec.config)}
        every = {f.name for k in registered_kinds() for f in dataclasses.fields(spec_of(k).config)}
        return {k: v for k, v in data.items() if k in own or k not in every}

    def options(self, cls: type, **values) -> "QuantizerConfig":
        """A config of class ``cls`` with ``values`` and this config's settings of the fields ``cls`` has (the
        adaptive ladder builds its inner ``ema`` codebooks this way)."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(self)}
        kept = {name: getattr(self, name) for name in shared if name not in values and name != "kind"}
        return cls(**kept, **values)


def _default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class CodebookOptions:
    """A codebook of ``codebook_size`` codes."""

    codebook_size: int = 512

    def check(self, fail) -> None:
        if self.codebook_size < 2:
            fail(f"codebook_size must be >= 2 (a single code carries no information), got {self.codebook_size}")


@dataclass
class CommitmentOptions:
    beta: float = 0.25  # commitment weight

    def check(self, fail) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            fail(f"beta (commitment weight) must be a finite number >= 0, got {self.beta}")


@dataclass
class DecayOptions:
    decay: float = 0.99  # EMA decay (EMA codebooks; usage tracking for dead codes)

    def check(self, fail) -> None:
        if not 0.0 < self.decay < 1.0:
            fail(f"decay must lie strictly between 0 and 1 (e.g. 0.99), got {self.decay}")


@dataclass
class SmoothingOptions:
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes

    def check(self, fail) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            fail(f"eps must be > 0 (e.g. 1e-5), got {self.eps}")


@dataclass
class RotationOptions:
    rotation_trick: bool = False  # gradient through the rotation-and-rescale map (Fifty et al. 2024)


@dataclass
class DeadCodeOptions:
    """Re-seeding unused codes (``SingleCodebookQuantizer``)."""

    dead_code_threshold: float = 0.0  # 0 = off; codes whose EMA usage count is below this are re-seeded
    # false: the threshold is an EMA count; true: a fraction of the uniform share (sum of counts / codes), the
    # same rule for codebooks of any size (with 2,048 inputs per step and 512 codes, 0.25 equals a count of 1)
    dead_code_relative: bool = False
    dead_code_window: int = 100  # training steps between dead-code checks

    def check(self, fail) -> None:
        if not (math.isfinite(self.dead_code_threshold) and self.dead_code_threshold >= 0):
            fail(f"dead_code_threshold must be >= 0 (0 turns the reset off), got {self.dead_code_threshold}")
        if self.dead_code_relative and not self.dead_code_threshold:
            fail("dead_code_relative=true needs dead_code_threshold > 0 (e.g. 0.25 of the uniform share)")
        if self.dead_code_window < 1:
            fail(f"dead_code_window must be >= 1 step, got {self.dead_code_window}")


@dataclass
class KMeansOptions:
    kmeans_iters: int = 10  # Lloyd iterations of init_codebook
    kmeans_seed: int = 0

    def check(self, fail) -> None:
        if self.kmeans_iters < 0:
            fail(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")


def check_schedule(fail, prefix: str, start: float, end: float, steps: int) -> None:
    """A temperature schedule from ``start`` down to ``end`` over ``steps`` optimizer steps."""
    if not (math.isfinite(start) and math.isfinite(end)) or start <= 0 or end <= 0:
        fail(f"{prefix}_start and {prefix}_end must be > 0 (and finite), got {start} and {end}")
    if end > start:
        fail(f"{prefix}_end ({end}) must not exceed {prefix}_start ({start}); the temperature anneals downwards")
    if steps < 1:
        fail(f"the {prefix} schedule's length must be >= 1 step, got {steps}")




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
