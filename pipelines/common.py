"""Helpers shared by the training pipelines: CLI, run folder, JSON-lines metrics, checkpoints.

Nothing here knows about models; the stage scripts build, ``prepare``, loop, log and save.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from vqgen.pipelines.stages import STAGE_RECORD, code_change, read_record, with_provenance, write_record
from vqgen.core.config import load_config, save_config
from vqgen.core.errors import CorruptFileError, UserError
from vqgen.core.io import atomic_path, check_safetensors, load_json, save_json
from vqgen.core.training import NonFiniteLossError  # noqa: F401  (raised here, defined with the training skeleton)

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
    # run the training forward through torch.compile (inductor); the first steps pay the compilation
    compile: bool = False

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

    A bad config raises ``ConfigError`` (``entry_point`` turns it into one line and exit code 2).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (fields not given keep their defaults)")
    parser.add_argument("--output-dir", help="run folder (overrides the config's output_dir)")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(config_cls, args.config, overrides), args


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the full traceback of a known failure instead of its one-line message."""
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors (also: VQGEN_DEBUG=1)")


def one_line(message: str) -> str:
    """A message on one line (library messages sometimes span several)."""
    return " ".join(str(message).split())


def entry_point(body: Callable | None = None, *, known: tuple[type[BaseException], ...] = ()):
    """Decorate a command's ``main(argv)``: known failures become one line on stderr and exit code 2.

    Known failures are ``UserError`` (bad config, missing or corrupt file, unusable data, a stale stage,
    a non-finite loss, ...) and the classes in ``known``. With ``--debug`` among the arguments (or
    ``VQGEN_DEBUG=1``) they keep their traceback; any other exception is a bug and always does.
    Every entry point uses this one wrapper.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def main(argv: Sequence[str] | None = None):
            args = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in args or os.environ.get("VQGEN_DEBUG", "") not in ("", "0")
            try:
                return fn(args)
            except (UserError, *known) as err:
                if debug:
                    raise
                _close_progress_bars()  # the message starts a line of its own, not after a bar's text
                print(f"error: {one_line(err)}", file=sys.stderr)
                raise SystemExit(2) from None

        return main

    return wrap(body) if body is not None else wrap


def _close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line, or vanishes when disabled)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def check_output_dir(path: str | Path, what: str = "--output-dir") -> Path:
    """Make sure ``path`` is (or can become) a writable folder before any work; creates it.

    Raises ``UserError`` naming the path when it is a file, lies under a file, or cannot be written.
    """
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"lies under {parent}, which is a file"
                raise UserError(f"{what} {path} {where}; give a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vqgen-write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err}); choose another folder") from None
    return path


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


def training_forward(model, train: TrainConfig):
    """What the training loop calls: the prepared model, or (``train.compile``) the same model through
    ``torch.compile``. Only the call is compiled: checkpoints, ``unwrap_model`` and saving see the plain model,
    and every run in a process decides for itself (Accelerate's dynamo setting is process-wide state)."""
    import torch

    return torch.compile(model) if train.compile else model


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
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
                with atomic_path(self.path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, values: dict, step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
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
        # every process writes its own RNG state into tmp: the rename waits for the slowest one
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the size of every file, so a resume can tell a truncated checkpoint from a good one
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            save_json({"step": step, "files": files, **(extra or {})}, tmp / CHECKPOINT_RECORD)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


CHECKPOINT_RECORD = "vqgen_state.json"
# What a damaged checkpoint file raises while Accelerate loads it (safetensors, torch's zip reader, pickle).
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``CorruptFileError`` naming the first bad file of a checkpoint folder.

    Checks what can be checked without loading it: the record written last (``vqgen_state.json``) and the
    sizes it lists, every safetensors header against its file size, and the CRCs of the zip archives that
    ``torch.save`` writes (optimizer, scheduler, RNG states, registered objects).
    """
    path = Path(path)
    record = load_json(path / CHECKPOINT_RECORD)
    for name, size in (record.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            raise CorruptFileError(file, "missing from its checkpoint")
        if file.stat().st_size != size:
            raise CorruptFileError(file, f"{file.stat().st_size} bytes, {size} when it was written")
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            check_safetensors(file)
        elif file.suffix in (".bin", ".pkl", ".pt") and zipfile.is_zipfile(file):
            try:
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CorruptFileError(file, str(err)) from None
            if bad is not None:
                raise CorruptFileError(file, f"entry {bad} fails its CRC check")
        elif file.suffix in (".bin", ".pkl", ".pt") and file.stat().st_size == 0:
            raise CorruptFileError(file, "empty")


def resume_latest(accelerator, checkpoints: CheckpointManager) -> int:
    """Load the newest usable checkpoint if there is one; returns the step to continue from (0 for a new run).

    Each checkpoint is verified (``verify_checkpoint``) and then loaded; one that fails either is skipped with
    a warning naming it, and the one before it is tried. When checkpoints exist but none is usable this
    raises ``CorruptFileError`` rather than silently starting over.
    """
    found = checkpoints.all()
    failures = []
    for step, path in reversed(found):
        try:
            verify_checkpoint(path)
            accelerator.load_state(str(path))
        except (UserError, *_LOAD_ERRORS) as err:
            reason = one_line(err)
            failures.append(f"{path.name}: {reason}")
            warn(accelerator, f"checkpoint {path} is unusable ({reason}); trying the one before it")
            continue
        if failures:
            warn(accelerator, f"resuming from the older checkpoint {path} (step {step})")
        else:
            accelerator.print(f"resuming from {path} (step {step})")
        return step
    if found:
        raise CorruptFileError(
            checkpoints.directory, f"no usable checkpoint ({'; '.join(failures)})",
            hint=f"delete {checkpoints.directory} to train from scratch",
        )
    return 0


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
    sampler; a dataset with ``set_augment_epoch`` is told the epoch too, for its augmentation), and the batches
    of a partly used epoch are skipped, so a resumed run sees the same data in the same order as an uninterrupted
    one.
    """
    epoch, skip = divmod(start_step * grad_accum, len(loader))
    while True:
        loader.set_epoch(epoch)
        if hasattr(loader.dataset, "set_augment_epoch"):  # augmentation per epoch (vqgen.tokenizer.data.Augmented)
            loader.dataset.set_augment_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        skip, epoch = 0, epoch + 1


def finish_run(accelerator, model, summary: dict, output_dir: str | Path, card: dict | None = None) -> dict:
    """Write ``model/`` (save_pretrained, with a model card of ``card`` (e.g. ``training_config``) and the
    summary metrics) and ``summary.json`` on the main process, then end the run."""
    if accelerator.is_main_process:
        model.save_pretrained(Path(output_dir) / "model", model_card_kwargs={**(card or {}), "summary": summary})
        save_json(summary, Path(output_dir) / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def write_run_config(cfg: Any, output_dir: str | Path, accelerator, record: dict | None = None,
                     resuming: bool = False) -> None:
    """Save the resolved config as ``config.yaml`` and the stage record (``pipelines.stages``) with this process's
    provenance, main process. ``resuming``: the run continues a checkpoint, whose record's code is kept in the
    history when it differs (with a warning)."""
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(output_dir) / "config.yaml")
        if record is not None:
            path = Path(output_dir) / STAGE_RECORD
            previous = read_record(path) if resuming else None
            change = code_change(previous)
            if change:
                warn(accelerator, change)
            write_record(path, with_provenance(record, previous))


def show_progress(accelerator) -> bool:
    """tqdm only on the main process, and not when stderr is not a terminal under CI."""
    return accelerator.is_local_main_process and not os.environ.get("VQGEN_NO_PROGRESS")


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


def warn(accelerator, message: str) -> None:
    """One ``warning: ...`` line on stderr, from the main process."""
    if accelerator is None or accelerator.is_main_process:
        print(f"warning: {one_line(message)}", file=sys.stderr)


def die(message: str) -> None:
    """Exit with a one-line error (for user errors caught in ``main``)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
