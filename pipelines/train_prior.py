"""Stage 2: train the GPT prior on encoded tokens.

Runs unchanged as ``python -m vqgen.pipelines.train_prior``, ``accelerate launch -m vqgen.pipelines.train_prior`` and
``accelerate launch --multi_gpu --num_processes N -m vqgen.pipelines.train_prior``::

    python -m vqgen.pipelines.train_prior --config configs/prior/synthetic_cond.yaml --output-dir RUN/prior tokens=RUN/tokens

Writes ``RUN/prior/``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*``, ``model/`` (the prior,
with the record of its tokenizer) and ``summary.json`` (``val_nll`` in nats per token of the saved model,
``bits_per_token``, ``steps`` (the configured budget), ``stopped_step``, ``best_step``, ``best_val_nll``,
``early_stopped``, ``tokens_per_second``, ...). A killed run resumes from its newest checkpoint with the
same command.

With ``train.early_stopping_patience > 0`` the validation NLL is measured every ``train.eval_every`` steps
(and at the last step); training stops after that many evaluations in a row without an improvement of more
than ``train.early_stopping_min_delta``, and ``model/`` holds the weights of the best evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from vqgen.pipelines.common import (
    CheckpointManager,
    EarlyStopping,
    MetricsLogger,
    TrainConfig,
    batch_stream,
    check_output_dir,
    entry_point,
    fail_on_nonfinite,
    finish_run,
    make_accelerator,
    training_forward,
    parse_cli,
    resume_latest,
    show_progress,
    write_run_config,
)
from vqgen.pipelines.stages import STAGE_RECORD, check_record, file_inputs, make_record
from vqgen.prior.config import PriorModelConfig
from vqgen.prior.data import TokenDataError, TokenDataset, read_token_meta, token_layout
from vqgen.prior.model import Prior
from vqgen.prior.vocab import TokenVocab
from vqgen.core import training
from vqgen.tokenizer.data import make_dataloader


@dataclass
class PriorTrainConfig(TrainConfig):
    """``TrainConfig`` with defaults suited to a small GPT: AdamW (0.9, 0.95), warm-up then cosine."""

    steps: int = 2000
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    eval_every: int = 500
    # 0: off. Otherwise stop after this many evaluations (every eval_every steps) in a row whose validation
    # NLL does not improve by more than early_stopping_min_delta nats; model/ then holds the best weights.
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            raise ValueError("early_stopping_patience and early_stopping_min_delta must be >= 0")
        if self.early_stopping_patience > 0 and self.eval_every < 1:
            raise ValueError(
                f"early_stopping_patience={self.early_stopping_patience} needs eval_every > 0 (the validation NLL "
                "is checked every eval_every steps); set eval_every or early_stopping_patience=0"
            )


@dataclass
class PriorRunConfig:
    """Everything one prior run needs; saved as ``config.yaml`` in the run folder.

    ``tokens`` is the directory written by ``pipelines.encode``; the prior inherits its tokenizer record.
    ``mixed_precision`` None takes the setting of ``accelerate launch`` (or its config file).
    """

    output_dir: str = "runs/prior"
    tokens: str = ""
    mixed_precision: str | None = None
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)

    def validate(self) -> None:
        if not self.tokens:
            raise ValueError("tokens is not set; pass tokens=RUN/tokens (the --output-dir of pipelines.encode)")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16, bf16 or null, got {self.mixed_precision!r}")


def build_optimizer(model: Prior, train: TrainConfig, num_training_steps: int):
    """AdamW with weight decay on matrices only (not on biases, norms), plus the warm-up/cosine schedule
    (the shared skeleton, :mod:`tokenizer.training`).

    The scheduler is stepped once per optimizer update by the loop (it is not handed to ``prepare``,
    which would step it once per process).
    """
    optimizer = training.make_optimizer(model, train.lr, train.betas, train.weight_decay, fused=train.fused)
    return optimizer, training.make_schedule(optimizer, train.lr_schedule, num_training_steps, train.warmup_steps)


@torch.no_grad()
def evaluate_prior(model: Prior, loader, accelerator, max_batches: int = 0) -> dict:
    """Mean validation NLL over every process's share (exact: each sequence has the same length)."""
    was_training = model.training
    model.eval()
    nlls = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with accelerator.autocast():
            out = model(batch["codes"], batch["label"] if model.vocab.class_conditional else None)
        nlls.append(accelerator.gather_for_metrics(out.nll.float()).double().cpu())
    model.train(was_training)
    nll = float(torch.cat(nlls).mean())
    return {"val_nll": nll, "bits_per_token": nll / math.log(2), "val_sequences": int(sum(x.numel() for x in nlls))}


def eval_due(step: int, train: PriorTrainConfig, early_stopping: bool) -> bool:
    """Whether optimizer step ``step`` ends with a validation pass inside the loop.

    Every ``eval_every`` steps before the last; with early stopping also at the last step, so the final
    weights compete with the earlier ones (without it the summary evaluates the final weights).
    """
    if step == train.steps:
        return early_stopping
    return bool(train.eval_every) and step % train.eval_every == 0


def prior_stage_record(cfg: PriorRunConfig, meta: dict | None = None) -> dict:
    """The stage record of a prior run: its config, its tokenizer's fingerprint and the sha256 of the token
    files it trains and validates on."""
    meta = meta if meta is not None else read_token_meta(cfg.tokens)
    splits = [s for s in ("train", "validation") if s in meta["splits"]]
    inputs = file_inputs({meta["splits"][s]["file"]: Path(cfg.tokens) / meta["splits"][s]["file"] for s in splits})
    return make_record("prior", cfg, {"tokenizer": meta["tokenizer"]["fingerprint"], **inputs})


def train_prior(cfg: PriorRunConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) one prior run into ``cfg.output_dir``; returns the summary dict.

    ``stop_after`` ends this invocation after that many optimizer steps in total (as if preempted);
    running it again resumes from the newest checkpoint.
    """
    from accelerate.utils import DataLoaderConfiguration

    out = check_output_dir(cfg.output_dir)
    meta = read_token_meta(cfg.tokens)
    if "train" not in meta["splits"]:
        raise TokenDataError(f"{cfg.tokens} has no encoded train split; run pipelines.encode with --splits train,...")
    checkpoints = CheckpointManager(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    stage_record = prior_stage_record(cfg, meta)
    if checkpoints.all():  # never continue a checkpoint trained on other tokens or with another config
        check_record(out / STAGE_RECORD, stage_record, PriorRunConfig, f"{out} holds a prior checkpoint",
                     f"resuming it would mix two trainings. Use another --output-dir, or delete {out} to start over "
                     "(vqgen run: --force prior)", legacy_folder=out)
    vocab = TokenVocab.from_layout(token_layout(meta), meta["num_classes"], cfg.model.class_conditional)
    extra = {"mixed_precision": cfg.mixed_precision} if cfg.mixed_precision else {}
    # Accumulation is done by hand below (exactly grad_accum micro-batches per update, also across epoch
    # ends), so the Accelerator itself runs with grad_accum=1.
    accelerator = make_accelerator(
        dataclasses.replace(cfg.train, grad_accum=1),
        out,
        "prior",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        **extra,
    )
    write_run_config(cfg, out, accelerator, stage_record, resuming=bool(checkpoints.all()))
    train_ds = TokenDataset(cfg.tokens, "train")
    val_split = "validation" if "validation" in meta["splits"] else "train"
    if val_split == "train":
        accelerator.print("warning: no encoded validation split; validation NLL is measured on the train split")
    val_ds = TokenDataset(cfg.tokens, val_split)

    model = Prior(cfg.model, vocab, tokenizer=meta["tokenizer"])
    optimizer, scheduler = build_optimizer(model, cfg.train, cfg.train.steps)
    train_loader = make_dataloader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, drop_last=True,
                                   num_workers=cfg.train.num_workers)
    val_loader = make_dataloader(val_ds, cfg.train.batch_size, shuffle=False)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    accelerator.register_for_checkpointing(scheduler)
    stopper = None
    if cfg.train.early_stopping_patience > 0:  # best weights and patience counter travel in the checkpoints
        stopper = EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta)
        accelerator.register_for_checkpointing(stopper)
    raw: Prior = accelerator.unwrap_model(model)
    forward = training_forward(model, cfg.train)

    start = resume_latest(accelerator, checkpoints)
    logger = MetricsLogger(out / "metrics.jsonl", accelerator, resume_step=start)
    accelerator.print(
        f"prior: {raw.num_parameters / 1e6:.2f}M parameters, vocabulary {vocab.vocab_size}, sequence {vocab.seq_len}, "
        f"{len(train_ds)} training sequences, {accelerator.num_processes} process(es)"
    )

    total = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    accum = cfg.train.grad_accum
    stream = batch_stream(accelerator, train_loader, start, accum)
    conditional = vocab.class_conditional
    tokens_per_seq = vocab.seq_len - 1  # predicted positions per sequence
    loss_sum = torch.zeros((), device=accelerator.device)
    watch = training.NonFiniteWatch(accelerator.device)  # first step with a non-finite loss (no host sync)
    tokens_trained, t_train = 0, 0.0
    progress = tqdm(total=cfg.train.steps, initial=start, disable=not show_progress(accelerator), desc="prior")
    model.train()
    step = start
    stopped = lambda: stopper is not None and stopper.stopped  # noqa: E731
    while step < total and not stopped():
        t0 = time.perf_counter()
        # Gradients are all-reduced only on the last micro-batch of an update.
        for _, batch in training.micro_batches(accelerator, [model], stream, accum):
            output = forward(batch["codes"], batch["label"] if conditional else None)
            accelerator.backward(output.loss / accum)
            loss_sum += output.loss.detach() / accum
            watch.update(output.loss, step + 1)
            tokens_trained += batch["codes"].shape[0] * tokens_per_seq * accelerator.num_processes
        if cfg.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        t_train += time.perf_counter() - t0
        progress.update(1)

        # Validation comes before this step's checkpoint, so the checkpoint holds its early-stopping state and a
        # resumed run neither repeats nor skips an evaluation.
        evaluation = None
        if eval_due(step, cfg.train, early_stopping=stopper is not None):
            evaluation = evaluate_prior(raw, val_loader, accelerator, cfg.train.eval_batches)
            if stopper is not None:
                stopper.update(evaluation["val_nll"], step, raw, evaluation)
                evaluation.update(best_val_nll=stopper.best_value, evals_without_improvement=stopper.bad_evals)
        is_last = step == total or stopped()
        logging_now = training.log_due(step, total, cfg.train.log_every) or is_last
        if logging_now or step % cfg.train.checkpoint_every == 0:
            first_bad = watch.first(accelerator.reduce)  # never checkpoint a NaN state
            if first_bad >= 0:
                fail_on_nonfinite(float("nan"), first_bad, checkpoints)
        if logging_now:
            loss = float(accelerator.reduce(loss_sum, reduction="mean")) / training.steps_since_log(step, cfg.train.log_every)
            fail_on_nonfinite(loss, step, checkpoints)
            loss_sum.zero_()
            record = {"loss": loss, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_second": tokens_trained / t_train if t_train > 0 else None}
            logger.log(record, step)
            progress.set_postfix(loss=f"{loss:.4f}")
        if evaluation is not None:
            logger.log(evaluation, step)
        if step % cfg.train.checkpoint_every == 0 or is_last:
            checkpoints.save(accelerator, step)
    progress.close()

    if step < cfg.train.steps and not stopped():  # stopped on purpose; the checkpoint above lets the next run resume
        accelerator.end_training()
        return {"steps": step, "stopped_early": True}
    if stopper is None:
        summary = evaluate_prior(raw, val_loader, accelerator, cfg.train.eval_batches)
        logger.log(summary, step)
        best_step = step
    else:  # the saved model is the best evaluation's, and so are the summary's validation numbers
        raw.load_state_dict(stopper.best_weights)
        summary, best_step = dict(stopper.best_metrics), stopper.best_step
        logger.log({"best_step": best_step, "best_val_nll": stopper.best_value, "early_stopped": stopped()}, step)
    summary.update(
        val_split=val_split,
        steps=cfg.train.steps,  # the configured budget (what pipelines.run checks), also after an early stop
        stopped_step=step,
        early_stopped=stopped(),
        best_step=best_step,
        best_val_nll=summary["val_nll"],
        tokens_per_second=tokens_trained / t_train if t_train > 0 else None,
        num_parameters=raw.num_parameters,
        vocab_size=vocab.vocab_size,
        seq_len=vocab.seq_len,
        class_conditional=conditional,
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
    )
    return finish_run(accelerator, raw, summary, out, card={"training_config": cfg})


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point: ``--config FILE --output-dir DIR key=value ...``."""
    cfg, _ = parse_cli(PriorRunConfig, argv, "Train the GPT prior on encoded tokens (stage 2).")
    return train_prior(cfg)


if __name__ == "__main__":
    main()
