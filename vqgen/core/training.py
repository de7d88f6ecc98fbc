"""One training skeleton for every loop in vqgen: optimizers, schedules, accumulation, non-finite watch, log cadence.

The tokenizer and prior trainers (``pipelines/``) and the feature-extractor loops (``eval/features.py``,
``eval/contrastive.py``) all build their optimizers, accumulate gradients, watch for non-finite losses and
decide when to log through these helpers, so a change to any of them (a second optimizer, a new schedule)
is made once. This is a library module: it never imports ``pipelines``.

- :func:`param_groups` / :func:`make_optimizer`: AdamW (optionally the fused kernel) with weight decay on weight
  matrices and kernels only (``p.dim() >= 2``), not on biases and norm gains; ``decay_all=True`` decays
  everything (what the cached feature extractors were trained with, kept so that their cached weights stay what
  this code trains).
- :func:`make_schedule`: ``constant`` or ``cosine`` with linear warm-up (``transformers``' schedules), or
  ``one_cycle``; stepped by the loop once per optimizer update (never handed to ``accelerator.prepare``,
  which would step it once per process).
- :func:`micro_batches`: the accumulation idiom: ``grad_accum`` micro-batches per update, gradients
  all-reduced only on the last one (``accelerator.no_sync`` on the others, for every model that trains),
  exactly ``grad_accum`` micro-batches also across epoch ends. The loop divides each loss by ``grad_accum``.
- :class:`NonFiniteWatch`: the first step whose loss was NaN/inf, kept on the device (no host sync per step);
  read at logging and checkpoint steps only.
- :func:`log_due` / :func:`steps_since_log`: the logging cadence (every ``log_every`` steps and the last).
- :class:`EarlyStopping`: the best validation value, the weights that reached it, and the patience counter.

The loop itself is :class:`vqgen.core.trainer.Trainer`'s.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import UserError

SCHEDULES = ("constant", "cosine", "one_cycle")


class NonFiniteLossError(UserError, RuntimeError):
    """Raised when training produces a NaN/inf loss; the message names the step and the way out."""


def param_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float,
                 decay_all: bool = False) -> list[dict]:
    """AdamW parameter groups: weight decay on tensors with ``dim() >= 2`` (weights, kernels, embeddings),
    none on biases and norm gains. ``decay_all`` puts every parameter in one decayed group. Frozen
    parameters (``requires_grad=False``) are left out."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    if decay_all:
        return [{"params": trainable, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(params: nn.Module | Iterable[nn.Parameter] | list[dict], lr: float,
                   betas: Iterable[float] = (0.9, 0.999), weight_decay: float = 0.0,
                   decay_all: bool = False, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``params`` (or over ready-made groups).

    ``fused``: PyTorch's fused AdamW kernel (one kernel per parameter group and device instead of a few
    ``foreach`` ones; the same update up to float rounding). Left off, PyTorch picks its default (``foreach``
    on CUDA). Loading a checkpoint keeps this choice, whichever kernel the checkpoint was saved with.
    """
    if isinstance(params, list) and params and isinstance(params[0], dict):
        groups = params
    else:
        groups = param_groups(params, weight_decay, decay_all)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True if fused else None)

    def keep_kernel(_, state_dict: dict) -> dict:
        # a checkpoint's groups carry the kernel choice they were saved with; the configured one wins (same update)
        for group in state_dict["param_groups"]:
            group["fused"] = True if fused else None
            if fused:
                group["foreach"] = None
        return state_dict

    optimizer.register_load_state_dict_pre_hook(keep_kernel)
    return optimizer


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, steps: int, warmup_steps: int = 0):
    """The learning-rate schedule of ``kind`` over ``steps`` optimizer updates.

    ``constant`` and ``cosine`` warm up linearly over ``warmup_steps`` (``transformers``' schedules);
    ``one_cycle`` is ``OneCycleLR`` with 10 % warm-up, and below 20 steps (tiny test settings, where its
    warm-up would be under two steps and divide by zero) a constant rate.
    """
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    if kind == "one_cycle":
        if steps < 20:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        max_lr = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr if len(max_lr) > 1 else max_lr[0],
                                                   total_steps=steps, pct_start=0.1)
    raise ValueError(f"unknown learning-rate schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def micro_batches(accelerator, models: Iterable[nn.Module], stream: Iterator, grad_accum: int):
    """Yield ``(index, batch)`` for the ``grad_accum`` micro-batches of one optimizer update.

    All but the last run inside ``accelerator.no_sync`` of every model in ``models`` (no all-reduce), so
    gradients are summed locally and all-reduced once. The caller backpropagates ``loss / grad_accum``.
    """
    models = list(models)
    for i in range(grad_accum):
        batch = next(stream)
        with contextlib.ExitStack() as stack:
            if i < grad_accum - 1:
                for model in models:
                    stack.enter_context(accelerator.no_sync(model))
            yield i, batch


class NonFiniteWatch:
    """The first step whose loss was not finite, as a device tensor (no host synchronisation per step).

    ``update(loss, step)`` records ``step`` if ``loss`` is NaN/inf and no earlier step was; ``first(reduce)``
    reads it (a host sync: call it at logging/checkpoint steps), taking the maximum over processes when a
    ``reduce`` function (e.g. ``accelerator.reduce``) is given, so every process agrees.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.step = torch.tensor(-1, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.step = torch.where((self.step < 0) & bad, torch.full_like(self.step, step), self.step)

    def first(self, reduce=None) -> int:
        value = self.step.clone()
        if reduce is not None:
            value = reduce(value, reduction="max")
        return int(value)

    def raise_if_bad(self, what: str, hint: str, reduce=None) -> None:
        """Raise :class:`NonFiniteLossError` ``"<what> became non-finite at step N; <hint>"`` if it did."""
        first = self.first(reduce)
        if first >= 0:
            raise NonFiniteLossError(f"{what} became non-finite at step {first}; {hint}")


def log_due(step: int, total: int, log_every: int) -> bool:
    """Whether optimizer step ``step`` (1-based) is logged: every ``log_every`` steps and the last one."""
    return step % log_every == 0 or step == total


def steps_since_log(step: int, log_every: int) -> int:
    """How many steps a running sum covers at logging step ``step`` (the last log was at a multiple of
    ``log_every``)."""
    return step - (step - 1) // log_every * log_every


def finite_or_nan(value: float) -> float:
    """``value`` unchanged, for symmetry with the logged values (NaN/inf are logged as null)."""
    return value if math.isfinite(value) else float("nan")


class EarlyStopping:
    """Best validation value so far, the weights that reached it, and evaluations without improvement.

    ``update`` is called after each validation. The best weights are the lowest value ever seen; the patience
    counter is reset only by an improvement of more than ``min_delta`` over the value that last reset it, and
    ``stopped`` turns true after ``patience`` evaluations in a row without one. The trainer saves its
    state in every checkpoint, so a resumed run continues with the same best weights and counter. Callers feed every process the same (gathered) value, so every process stops at the same step.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best_value = math.inf
        self.best_step = 0
        self.best_metrics: dict = {}  # the evaluation that gave best_value
        self.best_weights: dict = {}  # state_dict at best_step, on the CPU
        self.reference = math.inf  # the value that last reset the counter
        self.bad_evals = 0

    @property
    def stopped(self) -> bool:
        return self.bad_evals >= self.patience

    def update(self, value: float, step: int, model, metrics: dict | None = None) -> None:
        """Record one evaluation of ``model`` at ``step`` (lower is better; NaN never improves)."""
        if value < self.best_value:
            self.best_value, self.best_step, self.best_metrics = value, step, dict(metrics or {})
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if value < self.reference - self.min_delta:
            self.reference, self.bad_evals = value, 0
        else:
            self.bad_evals += 1

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "best_weights": self.best_weights, "reference": self.reference, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.best_metrics, self.best_weights = state["best_metrics"], state["best_weights"]
        self.reference, self.bad_evals = state["reference"], state["bad_evals"]
