"""The one training engine of vqgen. Every stage that trains (tokenizer, prior, the evaluation's feature
extractors) supplies a small :class:`Task`; the :class:`Trainer` owns everything else.

The trainer owns the run folder (``config.yaml``, the stage record, ``metrics.jsonl``, ``checkpoints/``,
``model/``, ``summary.json``), the ``Accelerator``, resuming, gradient accumulation, clipping, the non-finite
watch, the logging cadence (every logged training value is its mean over the micro-batches and steps since the
last log), checkpoints, evaluation with early stopping, an exponential moving average of the weights, and the
progress bar. One update::

    task.before_update(step)                            # e.g. the switch to quantized training
    for each of grad_accum micro-batches:               # no all-reduce but on the last one (every trained model)
        values = task.micro_step(batch, step)           # forward; trainer.backward(loss) for each loss
    task.before_optimizer(step, logging)                # e.g. gradient statistics before clipping
    for each trained model active at this step:         # the tokenizer, then its discriminator; or the prior
        clip, optimizer.step(), scheduler.step(), zero_grad
    task.after_update(step)                             # e.g. advance a temperature schedule
    EMA of the weights; log; evaluate (early stopping); checkpoint

Checkpoints (``checkpoints/step_XXXXXXXX/``) never hold pickled objects: model, EMA and best weights as
safetensors, optimizer / scheduler / gradient-scaler / RNG state as tensors and plain containers read back with
``torch.load(weights_only=True)``, the trainer's own state as JSON, and ``vqgen_state.json`` (written last) with
every file's size and sha256. A resume verifies them and falls back to the previous checkpoint when one does
not match or does not load (a failed RNG load included); none usable is an error, never a silent restart.

Continuing a run: ``train.steps`` may grow (the run continues from its newest checkpoint; the learning-rate
schedule is rebuilt for the new total and continues from the current step), and ``train.batch_size``,
``train.grad_accum`` or the number of processes may change (the data position is kept by samples seen, rounded
down to whole batches; processes without a saved RNG state are seeded from the seed, the step and their rank).
Only an unchanged run is bit-identical to an uninterrupted one. Every other change of the record is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import training
from .config import save_config
from .errors import CorruptFileError, MissingFileError, UserError, one_line, warn
from .diskspace import disk_full_guard, removed_on_failure
from .files import ensure_folder
from .io import atomic_path, check_safetensors, file_fingerprint, load_json, save_json
from .progress import report_step
from .records import (
    STAGE_RECORD,
    StaleStageError,
    code_change,
    read_record,
    record_changes,
    split_changes,
    with_provenance,
    write_record,
)
from .training import NonFiniteLossError

CHECKPOINT_FORMAT = 2
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
CHECKPOINT_RECORD = "vqgen_state.json"
TRAINER_STATE = "trainer.json"
# Keys of a trainer's config that a run can continue over (see the module docstring).
CONTINUABLE = ("train.steps", "train.batch_size", "train.grad_accum")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of every trainer (``train.*``)."""

    steps: int = 1000
    batch_size: int = 64  # per process
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # "constant" | "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every: int = 50
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 0
    eval_batches: int = 0  # 0: the whole validation split
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # run the training forward through torch.compile (inductor); the first steps pay the compilation
    compile: bool = False
    # PyTorch's fused AdamW kernel (vqgen.core.training.make_optimizer); the same update up to float rounding
    fused: bool = False
    # an exponential moving average of the weights, used for evaluation and the saved model (null: off)
    ema_decay: float | None = None
    # 0: off. Otherwise stop after this many evaluations (every eval_every steps) in a row whose monitored
    # validation value does not improve by more than early_stopping_min_delta; model/ then holds the best weights.
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive (and finite), got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("log_every, checkpoint_every and keep_checkpoints must be >= 1")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_batches < 0 or self.num_workers < 0:
            raise ValueError("warmup_steps, eval_every, eval_batches and num_workers must be >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be a list of two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.ema_decay is not None and not (math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must lie in [0, 1) (e.g. 0.999), or be null for no EMA; got {self.ema_decay}")
        if self.early_stopping_patience < 0 or not (math.isfinite(self.early_stopping_min_delta)
                                                    and self.early_stopping_min_delta >= 0):
            raise ValueError("early_stopping_patience and early_stopping_min_delta must be >= 0")
        if self.early_stopping_patience > 0 and self.eval_every < 1:
            raise ValueError(
                f"early_stopping_patience={self.early_stopping_patience} needs eval_every > 0 (the validation value "
                "is checked every eval_every steps); set eval_every or early_stopping_patience=0"
            )


class Task:
    """What a stage supplies to the :class:`Trainer`. Override what the stage needs; the defaults do nothing.

    ``setup`` builds the models, optimizers and data, registering every trained model with
    ``trainer.add_trained`` and the model that is saved with ``trainer.main``; ``micro_step`` runs the forward
    pass of one micro-batch and calls ``trainer.backward(loss)`` for each loss, returning the values to log
    (detached or not: the trainer detaches them) keyed by name, ``loss`` among them.
    """

    name = "task"
    description = ""  # the progress bar's label (default: the name)
    monitor: str | None = None  # the key of evaluate()'s result early stopping watches (lower is better)
    # what a user can do about a non-finite loss (the trainer's message ends with it)
    hint = ("Lower train.lr or enable clipping (train.max_grad_norm), then rerun the same command to resume.")

    def setup(self, trainer: "Trainer") -> None:
        raise NotImplementedError

    def batches(self, trainer: "Trainer", samples_seen: int) -> Iterator:
        """Endless micro-batches continuing after ``samples_seen`` training samples (all processes together)."""
        return trainer.batch_stream(self.train_loader, samples_seen)

    def batch_size(self, batch) -> int:
        """Samples in one micro-batch of this process."""
        return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)

    def on_start(self, trainer: "Trainer") -> None:
        """A new run (no checkpoint): e.g. k-means initialisation of a codebook."""

    def before_update(self, trainer: "Trainer", step: int) -> None:
        """Before the micro-batches of optimizer step ``step`` (0-based)."""

    def micro_step(self, trainer: "Trainer", batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer(self, trainer: "Trainer", step: int, logging: bool) -> None:
        """After the backward passes of step ``step``, before clipping and the optimizer steps."""

    def after_update(self, trainer: "Trainer", step: int) -> None:
        """After the optimizer steps of step ``step``."""

    def log_record(self, trainer: "Trainer", step: int) -> dict:
        """Extra values for the metrics line of a logging step (batch statistics, schedules)."""
        return {}

    def evaluate(self, trainer: "Trainer", step: int) -> dict | None:
        """Validation at ``eval_every`` steps (under the EMA weights when they are on)."""
        return None

    def finish(self, trainer: "Trainer", step: int) -> dict:
        """The summary of a finished run (the saved weights are in place: EMA or best)."""
        return {}

    def save(self, trainer: "Trainer", directory: Path, summary: dict) -> None:
        """Write the trained model (``model/``)."""
        trainer.unwrap(trainer.main).save_pretrained(directory, model_card_kwargs={**trainer.card, "summary": summary})


@dataclass
class Trained:
    """One trained model with its optimizer (both prepared), schedule and when it trains."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    active: Callable[[int], bool] = lambda step: True
    clip: bool = True


class Trainer:
    """Runs a :class:`Task` under a ``TrainConfig``.

    ``output_dir`` None trains in memory: no files, no checkpoints, no trackers (the cached feature extractors).
    ``record``: the stage record of this run (config and inputs, ``vqgen.core.records``), compared with the one
    in the folder before a checkpoint is resumed; ``record_cls`` and ``ignored`` say how to compare.
    ``config``: the whole resolved run config, saved as ``config.yaml`` and on the model card.
    """

    def __init__(self, task: Task, train: TrainConfig, output_dir: str | Path | None = None, *,
                 config: Any = None, record: dict | None = None, record_cls: type | None = None,
                 ignored: tuple[str, ...] = (), legacy_record: Callable[[], dict | None] | None = None,
                 accelerator_kwargs: dict | None = None, progress: bool = True):
        self.task = task
        self.cfg = train
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.config = config
        self.record = record
        self.record_cls = record_cls
        self.ignored = ignored
        self.legacy_record = legacy_record
        self.accelerator_kwargs = dict(accelerator_kwargs or {})
        self.progress_enabled = progress
        self.trained: list[Trained] = []
        self.main: nn.Module | None = None
        self.card: dict = {"training_config": config} if config is not None else {}
        self.ema: dict[str, dict[str, torch.Tensor]] = {}
        self.stopper: training.EarlyStopping | None = None
        self.samples_seen = 0
        self.samples_trained = 0  # by this invocation (throughput)
        self.train_seconds = 0.0
        self.resuming = False
        self.continued: list[dict] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._steps_in_sums = 0

    # ------------------------------------------------------------------ what tasks call
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def prepare(self, *objects):
        """``accelerator.prepare`` (models, optimizers, data loaders)."""
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def add_trained(self, name: str, model: nn.Module, optimizer, scheduler=None,
                    active: Callable[[int], bool] | None = None, clip: bool = True) -> None:
        """Register a prepared model and optimizer (and the schedule the trainer steps once per update)."""
        self.trained.append(Trained(name, model, optimizer, scheduler, active or (lambda step: True), clip))

    def forward_fn(self, model: nn.Module):
        """What the loop calls: the prepared model, or (``train.compile``) the same model through ``torch.compile``.
        Only the call is compiled: checkpoints and saving see the plain model."""
        return torch.compile(model) if self.cfg.compile else model

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss / grad_accum`` and watch it for NaN/inf (no host sync)."""
        self.watch.update(loss, self.step + 1)
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def batch_stream(self, loader, samples_seen: int) -> Iterator:
        """Endless micro-batches of a prepared loader continuing after ``samples_seen`` samples (all processes).

        Each epoch's shuffle is seeded by (data seed, epoch) through ``set_epoch`` (Accelerate's seedable sampler;
        a dataset with ``set_augment_epoch`` is told the epoch too, for its augmentation) and the batches of a
        partly used epoch are skipped, so a resumed run sees the same data in the same order
        as an uninterrupted one (with another batch size: the next whole batch after that many samples).
        """
        accelerator = self.accelerator
        micro = samples_seen // (self.cfg.batch_size * accelerator.num_processes)
        epoch, skip = divmod(micro, len(loader))

        def stream():
            nonlocal epoch, skip
            while True:
                loader.set_epoch(epoch)
                if hasattr(loader.dataset, "set_augment_epoch"):  # augmented views (vqgen.tokenizer.data.Augmented)
                    loader.dataset.set_augment_epoch(epoch)
                yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
                skip, epoch = 0, epoch + 1

        return stream()

    @contextlib.contextmanager
    def ema_weights(self):
        """The main model holds its EMA weights inside the block (unchanged without an EMA)."""
        if not self.ema:
            yield
            return
        model = self.unwrap(self.main)
        params = dict(model.named_parameters())
        saved = {name: p.detach().clone() for name, p in params.items() if name in self.ema["main"]}
        with torch.no_grad():
            for name, value in self.ema["main"].items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # ------------------------------------------------------------------ the run
    def fit(self, stop_after: int | None = None) -> dict:
        """Train (or resume, or continue) to ``train.steps``; returns the summary.

        ``stop_after`` ends this invocation after that many optimizer steps in total (as if the job were
        preempted); running it again resumes from the newest checkpoint.
        """
        cfg, task = self.cfg, self.task
        out = self.output_dir
        self.checkpoints = CheckpointStore(out / "checkpoints", cfg.keep_checkpoints) if out is not None else None
        if out is not None:
            ensure_folder(out)
            self.resuming = bool(self.checkpoints.all())
            if self.resuming:
                self._check_continuation()
        self.start()
        accelerator = self.accelerator
        start = self._resume() if self.resuming else 0
        if start == 0:
            task.on_start(self)
        self.step = start
        self.logger = MetricsLogger(out / "metrics.jsonl", accelerator, resume_step=start) if out is not None else None

        total = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        self.total = total
        stream = task.batches(self, self.samples_seen)
        progress = _progress(cfg.steps, start, task.description or task.name,
                             self.progress_enabled and show_progress(accelerator))
        for t in self.trained:
            t.model.train()
        stopped = lambda: self.stopper is not None and self.stopper.stopped  # noqa: E731
        step = start
        while step < total and not stopped():
            t0 = time.perf_counter()
            self.update(step, stream)
            step += 1
            self.step = step
            report_step(step, task.name)  # what an interrupt's message names
            self._steps_in_sums += 1
            self.train_seconds += time.perf_counter() - t0
            progress.update(1)

            # validation before this step's checkpoint, so the checkpoint holds its early-stopping state
            evaluation = self._evaluate_if_due(step)
            is_last = step == total or stopped()
            logging_now = training.log_due(step, total, cfg.log_every) or is_last
            checkpointing = out is not None and (step % cfg.checkpoint_every == 0 or is_last)
            if logging_now or checkpointing:
                first_bad = self.watch.first(accelerator.reduce)  # never checkpoint a NaN state
                if first_bad >= 0:
                    self._fail_nonfinite(first_bad)
            if logging_now:
                record = self._log_record(step, progress)
                if self.logger is not None:
                    self.logger.log(record, step)
            if evaluation is not None and self.logger is not None:
                self.logger.log(evaluation, step)
            if checkpointing:
                self.checkpoints.save(self, step)
        progress.close()

        if step < cfg.steps and not stopped():  # stopped on purpose; the checkpoint above lets the next run resume
            accelerator.end_training()
            return {"steps": step, "stopped_early": True}
        return self._finish(step, stopped())

    def start(self) -> None:
        """The accelerator (seeded), the run folder's config and record, the task's models, the EMA and early
        stopping: everything before the first update. ``fit`` calls it; a benchmark may call it and then
        :meth:`update` to time the stage's own step."""
        cfg, task = self.cfg, self.task
        self.accelerator = make_accelerator(cfg, self.output_dir, task.name, **self.accelerator_kwargs)
        if self.output_dir is not None:
            self._write_config()
        self.watch = training.NonFiniteWatch(self.accelerator.device)
        self.step = 0
        task.setup(self)
        if self.main is None:
            self.main = self.trained[0].model
        if cfg.ema_decay is not None:
            model = self.unwrap(self.main)
            self.ema["main"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if cfg.early_stopping_patience > 0 and task.monitor:
            self.stopper = training.EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)

    def update(self, step: int, stream: Iterator) -> None:
        """One optimizer update at step ``step`` (0-based) from ``grad_accum`` micro-batches of ``stream``: the
        task's hooks and passes, clipping, every active model's optimizer and schedule, the EMA."""
        cfg, task, accelerator = self.cfg, self.task, self.accelerator
        self.step = step
        task.before_update(self, step)
        active = [t for t in self.trained if t.active(step)]
        for _, batch in training.micro_batches(accelerator, [t.model for t in active], stream, cfg.grad_accum):
            values = task.micro_step(self, batch, step)
            self.last_values = {key: value.detach() for key, value in values.items()}
            for key, value in values.items():
                self._sums[key] = self._sums.get(key, 0) + value.detach().float() / cfg.grad_accum
            n = task.batch_size(batch) * accelerator.num_processes
            self.samples_seen += n
            self.samples_trained += n
        task.before_optimizer(self, step, training.log_due(step + 1, getattr(self, "total", cfg.steps), cfg.log_every))
        for t in active:
            if t.clip and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
            t.optimizer.step()
            if t.scheduler is not None:
                t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        task.after_update(self, step)
        self._update_ema()

    # ------------------------------------------------------------------ pieces of the loop
    def _update_ema(self) -> None:
        if not self.ema:
            return
        decay = self.cfg.ema_decay
        params = dict(self.unwrap(self.main).named_parameters())
        with torch.no_grad():
            for name, value in self.ema["main"].items():
                value.mul_(decay).add_(params[name].detach(), alpha=1.0 - decay)

    def _evaluate_if_due(self, step: int) -> dict | None:
        cfg = self.cfg
        if step == cfg.steps:  # the last step is evaluated here only when it competes for early stopping
            due = self.stopper is not None
        else:
            due = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if not due:
            return None
        with self.ema_weights():
            evaluation = self.task.evaluate(self, step)
            if evaluation is not None and self.stopper is not None:
                self.stopper.update(evaluation[self.task.monitor], step, self.unwrap(self.main), evaluation)
                evaluation = {**evaluation, f"best_{self.task.monitor}": self.stopper.best_value,
                              "evals_without_improvement": self.stopper.bad_evals}
        return evaluation

    def _log_record(self, step: int, progress) -> dict:
        accelerator = self.accelerator
        record = dict(self.task.log_record(self, step))
        steps = max(1, self._steps_in_sums)
        for key, value in self._sums.items():
            record[key] = float(accelerator.reduce(value, reduction="mean")) / steps
        self._sums, self._steps_in_sums = {}, 0
        if "loss" in record and not math.isfinite(record["loss"]):
            self._fail_nonfinite(step, record["loss"])
        main = next((t for t in self.trained if t.scheduler is not None), None)
        if main is not None:
            record["lr"] = main.scheduler.get_last_lr()[0]
        if "loss" in record:
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        return record

    def _fail_nonfinite(self, step: int, value: float = float("nan")) -> None:
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        where = (f"the last good checkpoint is {latest[1]} (step {latest[0]})" if latest
                 else "no checkpoint was written yet")
        where = f"; {where}" if self.checkpoints is not None else ""
        raise NonFiniteLossError(f"{self.task.name}: the loss became {value} at step {step}{where}. {self.task.hint}")

    def _finish(self, step: int, early_stopped: bool) -> dict:
        accelerator, task = self.accelerator, self.task
        main = self.unwrap(self.main)
        if self.stopper is not None:  # the saved model is the best evaluation's
            main.load_state_dict(self.stopper.best_weights)
            best_step, best_value = self.stopper.best_step, self.stopper.best_value
        else:
            if self.ema:  # the EMA weights are the result
                params = dict(main.named_parameters())
                with torch.no_grad():
                    for name, value in self.ema["main"].items():
                        params[name].copy_(value)
            best_step, best_value = step, None
        summary = task.finish(self, step)
        summary.update(steps=self.cfg.steps, stopped_step=step, early_stopped=early_stopped, best_step=best_step,
                       num_processes=accelerator.num_processes, ema_decay=self.cfg.ema_decay)
        if best_value is not None:
            summary[f"best_{task.monitor}"] = best_value
        if self.continued:
            summary["continued"] = self.continued
        if self.logger is not None and self.stopper is not None:
            self.logger.log({"best_step": best_step, f"best_{task.monitor}": best_value,
                             "early_stopped": early_stopped}, step)
        if self.output_dir is not None and accelerator.is_main_process:
            task.save(self, self.output_dir / "model", summary)
            save_json(summary, self.output_dir / "summary.json")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    # ------------------------------------------------------------------ records, resuming, continuing
    def _existing_record(self) -> dict | None:
        old = read_record(self.output_dir / STAGE_RECORD)
        if old is None and self.legacy_record is not None:
            old = self.legacy_record()
        return old

    def _check_continuation(self) -> None:
        """Refuse to resume checkpoints made with other settings; note the changes a run continues over."""
        if self.record is None:
            return
        old = self._existing_record()
        if old is None:
            return
        found = record_changes(old, self.record, self.record_cls, self.ignored)
        _, refused = split_changes(found, CONTINUABLE)
        out = self.output_dir
        if refused:
            raise StaleStageError(
                f"{out} holds a {self.task.name} checkpoint made with other settings ({'; '.join(refused)}); "
                f"resuming it would mix two configs (only {', '.join(CONTINUABLE)} can change between runs). Use "
                f"another --output-dir, or delete {out} to start over (vqgen run: --force {self.task.name})"
            )
        self.continued = list(old.get("continued") or [])

    def _write_config(self) -> None:
        """``config.yaml`` and the stage record (with this process's provenance and the run's continuations)."""
        if not self.accelerator.is_main_process:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            save_config(self.config, out / "config.yaml")
        if self.record is None:
            return
        previous = self._existing_record() if self.resuming else None
        change = code_change(previous)
        if change:
            warn(self.accelerator, change)
        self._record_now(previous)

    def _record_now(self, previous: dict | None = None) -> None:
        record = with_provenance(self.record, previous)
        if self.continued:
            record["continued"] = self.continued
        write_record(self.output_dir / STAGE_RECORD, record)

    def _resume(self) -> int:
        """Load the newest usable checkpoint; returns its step (see ``CheckpointStore.load``)."""
        step, state = self.checkpoints.load_newest(self)
        self.samples_seen = int(state.get("samples_seen", 0))
        notes = []
        for key, now in (("steps", self.cfg.steps), ("batch_size", self.cfg.batch_size),
                         ("grad_accum", self.cfg.grad_accum), ("num_processes", self.accelerator.num_processes)):
            before = state.get(key)
            if before is not None and before != now:
                notes.append(f"{key} {before} -> {now}")
        if step > self.cfg.steps:
            raise StaleStageError(
                f"{self.output_dir} has trained {step} steps already, more than train.steps={self.cfg.steps}; raise "
                "train.steps (the run continues) or use another --output-dir"
            )
        if notes:
            kind = "extended" if any(n.startswith("steps") for n in notes) else "rescaled"
            entry = {"at_step": step, "changes": notes}
            if not self.continued or self.continued[-1] != entry:
                self.continued.append(entry)
            warn(self.accelerator, f"{self.task.name}: continuing {self.output_dir} from step {step} with "
                                   f"{', '.join(notes)} ({kind}; the data position is kept by samples seen, and "
                                   "only an unchanged run is bit-identical to an uninterrupted one)")
            if self.accelerator.is_main_process and self.record is not None:
                self._record_now(read_record(self.output_dir / STAGE_RECORD))
        return step


def optimizer_and_schedule(model: nn.Module, train: TrainConfig):
    """AdamW (weight decay on weight tensors only) and the ``train.lr_schedule`` over ``train.steps`` updates; the
    trainer steps the schedule once per update (never ``prepare`` it: that would step it once per process)."""
    optimizer = training.make_optimizer(model, train.lr, train.betas, train.weight_decay, fused=train.fused)
    return optimizer, training.make_schedule(optimizer, train.lr_schedule, train.steps, train.warmup_steps)


def resolve_init_folder(source: str | Path, what: str) -> Path:
    """The model folder ``init_from`` names: a run folder (its ``model/``), a model folder, or a hub id."""
    from .hub import hub_folder, is_hub_id

    path = Path(source)
    if path.is_dir():
        folder = path / "model" if (path / "model" / "model.safetensors").is_file() else path
        if not (folder / "model.safetensors").is_file():
            raise MissingFileError(f"init_from={source} holds no model.safetensors (nor model/model.safetensors); "
                                   f"give a finished {what} run folder, its model/ folder, or a hub id")
        return folder
    if is_hub_id(str(source)):
        return hub_folder(str(source), what)
    raise MissingFileError(f"init_from={source} does not exist; give a finished {what} run folder, its model/ "
                           "folder, or a hub id")


def init_fingerprint(source: str | Path, what: str = "model") -> str:
    """sha256 of the weights ``init_from`` names (recorded as an input of the stage)."""
    return file_fingerprint(resolve_init_folder(source, what) / "model.safetensors")


def load_init_weights(model: nn.Module, source: str | Path, what: str = "model") -> dict:
    """Load the weights of ``source`` (see :func:`resolve_init_folder`) into ``model``, every tensor and shape
    matching; returns ``{"source", "path", "sha256"}`` for the record and the model card."""
    from safetensors.torch import load_model

    folder = resolve_init_folder(source, what)
    weights = folder / "model.safetensors"
    check_safetensors(weights)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # a shape that differs
        raise UserError(f"init_from={source}: its weights do not fit this {what} ({one_line(err)[:300]}); the "
                        "architecture settings must be those of the run it comes from") from None
    if missing or unexpected:
        raise UserError(f"init_from={source}: its weights do not fit this {what} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); the architecture settings must be those of the run it comes from")
    return {"source": str(source), "path": str(folder.resolve()), "sha256": file_fingerprint(weights)}


def task_step(task: Task, train: TrainConfig, batch) -> Callable[[], None]:
    """One optimizer update of ``task`` as a callable, on the fixed micro-batch ``batch`` (or on the next
    micro-batches of ``batch`` when it is an iterator): what a benchmark times is the stage's own step (its task
    under the trainer, in memory), never a copy of it. ``step.trainer`` is the trainer (its models, e.g. to change
    their memory format), ``step.batch`` the fixed batch (the same object every step), ``step.trainer.last_values``
    the values the last micro-batch returned (``loss``, ...)."""
    import itertools

    trainer = Trainer(task, dataclasses.replace(train, trackers=[]), progress=False)
    trainer.start()
    for t in trainer.trained:
        t.model.train()
    stream = batch if isinstance(batch, Iterator) else itertools.repeat(batch)
    counter = itertools.count()

    def step() -> None:
        trainer.update(next(counter), stream)

    step.trainer, step.batch = trainer, batch
    return step


def run_complete(summary_path: str | Path, steps: int) -> bool:
    """Whether a trainer's ``summary.json`` says it finished ``steps`` optimizer steps (or stopped earlier by
    early stopping with that budget)."""
    path = Path(summary_path)
    if not path.is_file():
        return False
    summary = load_json(path)
    if summary.get("steps") != steps:
        return False
    stopped = summary.get("stopped_step", steps)
    return stopped == steps or (summary.get("early_stopped") is True and stopped < steps)


def show_progress(accelerator) -> bool:
    """tqdm only on the main process, and not with ``VQGEN_NO_PROGRESS`` set."""
    return accelerator.is_local_main_process and not os.environ.get("VQGEN_NO_PROGRESS")


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc)


def make_accelerator(train: TrainConfig, output_dir: str | Path | None, project_name: str, **accelerator_kwargs):
    """An ``Accelerator`` (accumulation is the trainer's, so it runs with ``gradient_accumulation_steps=1``) with
    the trackers of ``train.trackers`` that are installed (none without an output folder). Mixed precision and
    the process layout come from ``accelerate launch`` (or its config file)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    trackers = [t for t in train.trackers if t != "tensorboard" or _has_tensorboard()] if output_dir else []
    project = (ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs"))
               if output_dir else None)
    accelerator = Accelerator(cpu=use_cpu_processes(), log_with=trackers or None, project_config=project,
                              **accelerator_kwargs)
    set_seed(train.seed, deterministic=train.deterministic)
    if trackers:
        accelerator.init_trackers(project_name)
    return accelerator


def use_cpu_processes() -> bool:
    """True for several processes on a machine without CUDA (``--multi_gpu`` on a CPU box): Accelerate only
    picks its multi-CPU (gloo) mode when told to use the CPU; without it each process would train alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process) and to the trackers.

    On resume, lines from steps after the restored checkpoint are dropped so the file never holds two histories.
    """

    def __init__(self, path: str | Path, accelerator, resume_step: int = 0):
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
                with atomic_path(self.path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, values: dict, step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if self.accelerator.is_main_process:
            with disk_full_guard(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=step)


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill (or empty) counts as after any resume point."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


def _plain(value: Any) -> Any:
    """Tensors and numpy values -> JSON-serialisable Python numbers/lists (NaN/inf -> null)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _torch_load(path: Path) -> Any:
    """Tensors and plain containers only: ``weights_only=True`` refuses anything that would run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every random generator a training step draws from, as tensors and plain containers."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s generators; a state of the wrong shape raises."""
    import numpy as np

    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """``random.setstate`` wants tuples where a round trip may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class CheckpointStore:
    """``checkpoints/step_<N>`` folders, written atomically (a temporary folder, renamed when complete), the
    newest ``keep`` kept. See the module docstring for what a checkpoint holds."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def all(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            m = CHECKPOINT_PATTERN.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, trainer: Trainer, step: int) -> None:
        """Every process must call this; each writes its RNG state, the main process everything else."""
        accelerator = trainer.accelerator
        main = accelerator.is_main_process
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        # nothing half-written: a failure or an interrupt anywhere before the rename (the writes, the fingerprints
        # that take a while on a large model, the record) removes the temporary folder
        with disk_full_guard(tmp), removed_on_failure(tmp, main):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            _torch_save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
            if main:
                self._write_state(trainer, tmp, step)
            accelerator.wait_for_everyone()  # every RNG file is in place before the record lists them
            if main:
                files = {p.name: {"size": p.stat().st_size, "sha256": file_fingerprint(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
                save_json({"format": CHECKPOINT_FORMAT, "step": step, "files": files}, tmp / CHECKPOINT_RECORD)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        if main:
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _write_state(self, trainer: Trainer, tmp: Path, step: int) -> None:
        from safetensors.torch import save_model

        for t in trainer.trained:
            save_model(trainer.unwrap(t.model), str(tmp / f"model_{t.name}.safetensors"))
            _torch_save(t.optimizer.state_dict(), tmp / f"optimizer_{t.name}.pt")
            if t.scheduler is not None:
                _torch_save(t.scheduler.state_dict(), tmp / f"scheduler_{t.name}.pt")
        for name, tensors in trainer.ema.items():
            _save_tensors(tensors, tmp / f"ema_{name}.safetensors")
        if trainer.stopper is not None:
            state = trainer.stopper.state_dict()
            _save_tensors(state.pop("best_weights") or {"__empty__": torch.zeros(0)}, tmp / "best_weights.safetensors")
            save_json(state, tmp / "early_stopping.json")
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        save_json({"format": CHECKPOINT_FORMAT, "step": step, "samples_seen": trainer.samples_seen,
                   "steps": trainer.cfg.steps, "batch_size": trainer.cfg.batch_size,
                   "grad_accum": trainer.cfg.grad_accum, "num_processes": trainer.accelerator.num_processes,
                   "models": [t.name for t in trainer.trained]}, tmp / TRAINER_STATE)

    @staticmethod
    def verify(path: Path) -> dict:
        """The checkpoint's trainer state, after checking that every file it lists is there with its size and
        sha256 (``CorruptFileError`` naming the first that is not)."""
        record_path = path / CHECKPOINT_RECORD
        if not record_path.is_file():
            raise CorruptFileError(path, f"no {CHECKPOINT_RECORD} (an interrupted write, or not a vqgen checkpoint)")
        record = load_json(record_path)
        if record.get("format") != CHECKPOINT_FORMAT:
            raise CorruptFileError(
                path, "written by an older vqgen in a format that needs unpickling, which vqgen does not do; finish "
                      "that run with the version that started it, or start over")
        for name, entry in (record.get("files") or {}).items():
            file = path / name
            if not file.is_file():
                raise CorruptFileError(file, "missing from its checkpoint")
            if file.stat().st_size != entry["size"]:
                raise CorruptFileError(file, f"{file.stat().st_size} bytes, {entry['size']} when it was written")
            if file_fingerprint(file) != entry["sha256"]:
                raise CorruptFileError(file, "its sha256 differs from the one recorded when it was written")
        return load_json(path / TRAINER_STATE)

    def load(self, trainer: Trainer, path: Path) -> dict:
        """Verify ``path`` and load it into the trainer's models, optimizers, schedules, EMA, early stopping,
        gradient scaler and this process's RNG; returns the trainer state."""
        from safetensors.torch import load_model

        state = self.verify(path)
        names = [t.name for t in trainer.trained]
        if state.get("models") != names:
            raise CorruptFileError(path, f"holds the models {state.get('models')}, this run trains {names}")
        for t in trainer.trained:
            file = path / f"model_{t.name}.safetensors"
            check_safetensors(file)
            missing, unexpected = load_model(trainer.unwrap(t.model), str(file), strict=False)
            if missing or unexpected:
                raise CorruptFileError(file, f"does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            t.optimizer.load_state_dict(_torch_load(path / f"optimizer_{t.name}.pt"))
            if t.scheduler is not None:
                t.scheduler.load_state_dict(_torch_load(path / f"scheduler_{t.name}.pt"))
                _rebase_schedule(t.scheduler)
        for name in trainer.ema:
            loaded = _load_tensors(path / f"ema_{name}.safetensors")
            if set(loaded) != set(trainer.ema[name]):
                raise CorruptFileError(path / f"ema_{name}.safetensors", "does not hold the model's parameters")
            for key, value in loaded.items():
                trainer.ema[name][key].copy_(value)
        if trainer.stopper is not None:
            stop = load_json(path / "early_stopping.json")
            weights = _load_tensors(path / "best_weights.safetensors")
            weights.pop("__empty__", None)
            trainer.stopper.load_state_dict({**stop, "best_weights": weights})
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(_torch_load(path / "scaler.pt"))
        rng = path / f"rng_{trainer.accelerator.process_index}.pt"
        if rng.is_file():
            set_rng_state(_torch_load(rng))
        else:  # more processes than when it was saved: a seed of this process's own, stated
            seed = (trainer.cfg.seed * 1_000_003 + state["step"] * 1_009 + trainer.accelerator.process_index) % 2**32
            from accelerate.utils import set_seed

            set_seed(seed)
            warn(None, f"process {trainer.accelerator.process_index} has no saved random state in {path}: seeded "
                       f"from the seed, the step and its rank ({seed})")
        return state

    def load_newest(self, trainer: Trainer) -> tuple[int, dict]:
        """The newest checkpoint that verifies and loads, falling back past damaged ones with a warning naming
        each; ``CorruptFileError`` when none is usable (never a silent restart)."""
        found = self.all()
        failures = []
        for step, path in reversed(found):
            try:
                state = self.load(trainer, path)
            except (UserError, OSError, RuntimeError, ValueError, KeyError, EOFError, TypeError) as err:
                reason = one_line(err)
                failures.append(f"{path.name}: {reason}")
                warn(trainer.accelerator, f"checkpoint {path} is unusable ({reason}); trying the one before it")
                continue
            if failures:
                warn(trainer.accelerator, f"resuming from the older checkpoint {path} (step {step})")
            else:
                trainer.accelerator.print(f"resuming from {path} (step {step})")
            return step, state
        raise CorruptFileError(
            self.directory, f"no usable checkpoint ({'; '.join(failures)})",
            hint=f"delete {self.directory} to train from scratch",
        )


def _rebase_schedule(scheduler) -> None:
    """Set the optimizer's learning rates to what the (possibly rebuilt) schedule gives at its restored step: a
    run whose ``train.steps`` grew follows the new schedule from here on; an unchanged one gets the same rates."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
