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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vqgen.core.records import file_inputs, make_record
from vqgen.core.trainer import (
    Task,
    TrainConfig,
    Trainer,
    init_fingerprint,
    optimizer_and_schedule,
    resolve_init_folder,
    run_complete,
)
from vqgen.core.errors import UserError
from vqgen.core.files import owns_folder
from vqgen.pipelines.common import entry_point, parse_cli
from vqgen.pipelines.stages import legacy_record
from vqgen.prior.config import PriorModelConfig
from vqgen.prior.data import TokenDataError, TokenDataset, read_token_meta, token_layout
from vqgen.prior.model import Prior
from vqgen.prior.vocab import TokenVocab
from vqgen.tokenizer.data import make_dataloader


@dataclass
class PriorTrainConfig(TrainConfig):
    """``TrainConfig`` with defaults suited to a small GPT: AdamW (0.9, 0.95), warm-up then cosine, validation NLL
    every 500 steps (``early_stopping_patience`` > 0 stops on it)."""

    steps: int = 2000
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    eval_every: int = 500


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
    # fine-tune: start from the weights of another prior (its run folder, model/ folder or a hub id) trained on
    # tokens of the same tokenizer; the model settings must be that prior's; the optimizer starts fresh
    init_from: str | None = None

    def validate(self) -> None:
        if not self.tokens:
            raise ValueError("tokens is not set; pass tokens=RUN/tokens (the --output-dir of pipelines.encode)")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16, bf16 or null, got {self.mixed_precision!r}")


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


def prior_stage_record(cfg: PriorRunConfig, meta: dict | None = None) -> dict:
    """The stage record of a prior run: its config, its tokenizer's fingerprint, the sha256 of the token files it
    trains and validates on, and of the weights it starts from (``init_from``)."""
    meta = meta if meta is not None else read_token_meta(cfg.tokens)
    splits = [s for s in ("train", "validation") if s in meta["splits"]]
    inputs = file_inputs({meta["splits"][s]["file"]: Path(cfg.tokens) / meta["splits"][s]["file"] for s in splits})
    if cfg.init_from:
        inputs["init_from"] = init_fingerprint(cfg.init_from, "prior")
    return make_record("prior", cfg, {"tokenizer": meta["tokenizer"]["fingerprint"], **inputs})


class PriorTask(Task):
    """Stage 2 as a trainer task: the GPT prior on encoded tokens, validation NLL (early stopping watches it)."""

    name = "prior"
    monitor = "val_nll"

    def __init__(self, cfg: PriorRunConfig, meta: dict | None = None, vocab: TokenVocab | None = None):
        """``meta``: the token folder's ``meta.json`` (the vocabulary, the token files); or, in memory (a benchmark
        of the step), only ``vocab``: no data, no validation."""
        self.cfg = cfg
        self.meta = meta
        self.vocab = vocab

    def setup(self, trainer: Trainer) -> None:
        cfg, meta = self.cfg, self.meta
        accelerator = trainer.accelerator
        vocab = (self.vocab if meta is None else
                 TokenVocab.from_layout(token_layout(meta), meta["num_classes"], cfg.model.class_conditional))
        model = Prior(cfg.model, vocab, tokenizer=meta["tokenizer"] if meta is not None else None)
        if cfg.init_from and not trainer.resuming:
            self.init_record = load_prior_weights(model, cfg.init_from, meta)
            accelerator.print(f"prior: weights from {cfg.init_from} (fine-tuning; fresh optimizer)")
        optimizer, scheduler = optimizer_and_schedule(model, cfg.train)
        if meta is None:
            model, optimizer = trainer.prepare(model, optimizer)
            self.train_loader = self.val_loader = None
        else:
            train_ds = TokenDataset(cfg.tokens, "train")
            self.num_train = len(train_ds)
            self.val_split = "validation" if "validation" in meta["splits"] else "train"
            if self.val_split == "train":
                accelerator.print("warning: no encoded validation split; validation NLL is measured on the train split")
            val_ds = TokenDataset(cfg.tokens, self.val_split)
            train_loader = make_dataloader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                           drop_last=True, num_workers=cfg.train.num_workers)
            val_loader = make_dataloader(val_ds, cfg.train.batch_size, shuffle=False)
            model, optimizer, self.train_loader, self.val_loader = trainer.prepare(model, optimizer, train_loader,
                                                                                   val_loader)
        trainer.add_trained("prior", model, optimizer, scheduler)
        self.raw: Prior = trainer.unwrap(model)
        self.forward = trainer.forward_fn(model)
        self.vocab = vocab
        self.tokens_per_seq = vocab.seq_len - 1  # predicted positions per sequence
        if meta is not None:
            accelerator.print(
                f"prior: {self.raw.num_parameters / 1e6:.2f}M parameters, vocabulary {vocab.vocab_size}, sequence "
                f"{vocab.seq_len}, {self.num_train} training sequences, {accelerator.num_processes} "
                "process(es)"
            )

    def micro_step(self, trainer: Trainer, batch, step: int) -> dict:
        output = self.forward(batch["codes"], batch["label"] if self.vocab.class_conditional else None)
        trainer.backward(output.loss)
        return {"loss": output.loss}

    def log_record(self, trainer: Trainer, step: int) -> dict:
        seconds = trainer.train_seconds
        return {"tokens_per_second": trainer.samples_trained * self.tokens_per_seq / seconds if seconds > 0 else None}

    def evaluate(self, trainer: Trainer, step: int) -> dict:
        return evaluate_prior(self.raw, self.val_loader, trainer.accelerator, self.cfg.train.eval_batches)

    def finish(self, trainer: Trainer, step: int) -> dict:
        """The saved weights' validation numbers (with early stopping: the best evaluation's, measured then)."""
        if trainer.stopper is not None:
            summary = dict(trainer.stopper.best_metrics)
        else:
            summary = evaluate_prior(self.raw, self.val_loader, trainer.accelerator, self.cfg.train.eval_batches)
            if trainer.logger is not None:
                trainer.logger.log(summary, step)
        seconds = trainer.train_seconds
        summary.update(
            val_split=self.val_split,
            best_val_nll=summary["val_nll"],
            tokens_per_second=trainer.samples_trained * self.tokens_per_seq / seconds if seconds > 0 else None,
            num_parameters=self.raw.num_parameters,
            vocab_size=self.vocab.vocab_size,
            seq_len=self.vocab.seq_len,
            class_conditional=self.vocab.class_conditional,
            mixed_precision=trainer.accelerator.mixed_precision,
        )
        if self.cfg.init_from:
            summary["init_from"] = getattr(self, "init_record", None) or {"source": self.cfg.init_from}
        return summary


def load_prior_weights(model: Prior, source: str, meta: dict) -> dict:
    """Start ``model`` from the prior ``source`` names; it must model the same tokenizer's tokens (one line
    otherwise) and have the same architecture. Returns the record for the stage and the model card."""
    from vqgen.core.io import file_fingerprint

    folder = resolve_init_folder(source, "prior")
    trained = Prior.from_pretrained(folder)
    theirs = (trained.tokenizer or {}).get("fingerprint")
    ours = meta["tokenizer"]["fingerprint"]
    if theirs != ours:
        raise UserError(
            f"init_from={source}: that prior models the tokens of another tokenizer ({str(theirs)[:12]}), these "
            f"tokens come from {ours[:12]}; a fine-tuned prior stays bound to its tokenizer, so start from a prior "
            "trained on this tokenizer's tokens"
        )
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError as err:
        raise UserError(f"init_from={source}: its weights do not fit this prior ({' '.join(str(err).split())[:300]}); "
                        "the model settings must be those of the prior it comes from") from None
    return {"source": str(source), "path": str(folder.resolve()),
            "sha256": file_fingerprint(folder / "model.safetensors")}


def stage_record(cfg: PriorRunConfig, run: Path) -> dict:
    return prior_stage_record(cfg)


def stage_complete(cfg: PriorRunConfig, run: Path) -> bool:
    return run_complete(Path(cfg.output_dir) / "summary.json", cfg.train.steps)


def run_stage(cfg: PriorRunConfig, run: Path) -> dict:
    return train_prior(cfg)


@owns_folder(lambda cfg, *args, **kwargs: cfg.output_dir, "prior")
def train_prior(cfg: PriorRunConfig, stop_after: int | None = None) -> dict:
    """Train (or resume, or continue) one prior run into ``cfg.output_dir``; returns the summary dict.

    ``stop_after`` ends this invocation after that many optimizer steps in total (as if preempted); running it
    again resumes from the newest checkpoint.
    """
    from accelerate.utils import DataLoaderConfiguration

    from vqgen.pipelines.stages import IGNORED

    meta = read_token_meta(cfg.tokens)
    if "train" not in meta["splits"]:
        raise TokenDataError(f"{cfg.tokens} has no encoded train split; run vqgen.pipelines.encode with --splits train,...")
    out = Path(cfg.output_dir)
    extra = {"mixed_precision": cfg.mixed_precision} if cfg.mixed_precision else {}
    trainer = Trainer(
        PriorTask(cfg, meta), cfg.train, out, config=cfg, record=prior_stage_record(cfg, meta),
        record_cls=PriorRunConfig, ignored=IGNORED["prior"], legacy_record=lambda: legacy_record("prior", out),
        accelerator_kwargs={
            "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
            **extra,
        },
    )
    return trainer.fit(stop_after)


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point: ``--config FILE --output-dir DIR key=value ...``."""
    cfg, _ = parse_cli(PriorRunConfig, argv, "Train the GPT prior on encoded tokens (stage 2).")
    return train_prior(cfg)


if __name__ == "__main__":
    main()
