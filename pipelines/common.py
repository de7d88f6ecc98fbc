"""Helpers shared by the training pipelines: CLI, run folder, JSON-lines metrics, checkpoints.

Nothing here knows about models; the stage scripts build, ``prepare``, loop, log and save.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenizer.config import ConfigError, load_config, save_config
from tokenizer.io import atomic_path, save_json

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by the tokenizer and prior trainers."""

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

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("log_every, checkpoint_every and keep_checkpoints must be >= 1")
        if len(self.betas) != 2:
            raise ValueError("betas must be a list of two numbers, e.g. [0.9, 0.999]")


def parse_cli(config_cls: type, argv: Sequence[str] | None, description: str) -> tuple[Any, argparse.Namespace]:
    """``--config FILE --output-dir DIR key=value ...`` -> (resolved config, args).

    A bad config exits with one line naming the problem instead of a traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (fields not given keep their defaults)")
    parser.add_argument("--output-dir", help="run folder (overrides the config's output_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        cfg = load_config(config_cls, args.config, overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return cfg, args


def make_accelerator(train: TrainConfig, output_dir: str | Path, project_name: str, **accelerator_kwargs):
    """An ``Accelerator`` with gradient accumulation and TensorBoard tracking where it is installed.

    Mixed precision and the process layout come from ``accelerate launch`` (or its config file).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    trackers = [t for t in train.trackers if t != "tensorboard" or _has_tensorboard()]
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=train.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        **accelerator_kwargs,
    )
    set_seed(train.seed, deterministic=train.deterministic)
    if trackers:
        accelerator.init_trackers(project_name)
    return accelerator


def use_cpu_processes() -> bool:
    """True for several processes on a machine without CUDA (``--multi_gpu`` on a CPU box).

    Accelerate only picks its multi-CPU (gloo) mode when told to use the CPU; without this flag each
    process would silently train alone.
    """
    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process) and to the trackers.

    On resume, lines from steps after the restored checkpoint are dropped so the file never holds two
    histories.
    """

    def __init__(self, path: str | Path, accelerator, resume_step: int = 0):
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
                with atomic_path(self.path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, values: dict, step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=step)


def _plain(value: Any) -> Any:
    """Tensors and numpy values -> JSON-serialisable Python numbers/lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class CheckpointManager:
    """``checkpoints/step_<N>`` folders written by ``accelerator.save_state``, atomically, newest ``keep`` kept."""

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

    def latest(self) -> tuple[Path, int] | None:
        found = self.all()
        return (found[-1][1], found[-1][0]) if found else None

    def save(self, accelerator, step: int, extra: dict | None = None) -> None:
        """Every process must call this (``save_state`` synchronises); only the main one writes files."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            save_json({"step": step, **(extra or {})}, tmp / "vqgen_state.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


def resume_latest(accelerator, checkpoints: CheckpointManager) -> int:
    """Load the newest checkpoint if there is one; returns the step to continue from (0 for a new run)."""
    latest = checkpoints.latest()
    if latest is None:
        return 0
    accelerator.load_state(str(latest[0]))
    accelerator.print(f"resuming from {latest[0]} (step {latest[1]})")
    return latest[1]


class EarlyStopping:
    """Best validation value so far, the weights that reached it, and evaluations without improvement.

    ``update`` is called after each validation. The best weights are the lowest value ever seen; the patience
    counter is reset only by an improvement of more than ``min_delta`` over the value that last reset it, and
    ``stopped`` turns true after ``patience`` evaluations in a row without one. Register it with
    ``accelerator.register_for_checkpointing`` so a resumed run continues with the same best weights and
    counter. Callers feed every process the same (gathered) value, so every process stops at the same step.
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


def batch_stream(accelerator, loader, start_step: int, grad_accum: int):
    """Endless micro-batches that continue exactly where optimizer step ``start_step`` left off.

    Each epoch's shuffle is seeded by (data seed, epoch) through ``set_epoch`` (Accelerate's seedable
    sampler), and the batches of a partly used epoch are skipped, so a resumed run sees the same data
    in the same order as an uninterrupted one.
    """
    epoch, skip = divmod(start_step * grad_accum, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        skip, epoch = 0, epoch + 1


def finish_run(accelerator, model, summary: dict, output_dir: str | Path) -> dict:
    """Write ``model/`` (save_pretrained) and ``summary.json`` on the main process, then end the run."""
    if accelerator.is_main_process:
        model.save_pretrained(Path(output_dir) / "model")
        save_json(summary, Path(output_dir) / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def write_run_config(cfg: Any, output_dir: str | Path, accelerator) -> None:
    """Save the resolved config as ``config.yaml`` in the run folder (main process)."""
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(output_dir) / "config.yaml")


def show_progress(accelerator) -> bool:
    """tqdm only on the main process, and not when stderr is not a terminal under CI."""
    return accelerator.is_local_main_process and not os.environ.get("VQGEN_NO_PROGRESS")


class NonFiniteLossError(RuntimeError):
    """Raised when training produces a NaN/inf loss; the message names the step and the last checkpoint."""


def fail_on_nonfinite(loss_value: float, step: int, checkpoints: CheckpointManager) -> None:
    """Stop with a clear message when the loss is NaN or inf (the last good checkpoint stays on disk)."""
    if math.isfinite(loss_value):
        return
    latest = checkpoints.latest()
    where = f"the last good checkpoint is {latest[0]} (step {latest[1]})" if latest else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"loss became {loss_value} at step {step}; {where}. Lower train.lr or enable clipping "
        "(train.max_grad_norm), then rerun the same command to resume."
    )


def die(message: str) -> None:
    """Exit with a one-line error (for user errors caught in ``main``)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
