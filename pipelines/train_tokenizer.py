"""Stage 1: train a VQ-VAE tokenizer, the usual way or with deferred quantization.

Runs unchanged as ``python -m vqgen.pipelines.train_tokenizer``, ``accelerate launch -m vqgen.pipelines.train_tokenizer``
and ``accelerate launch --multi_gpu --num_processes N -m vqgen.pipelines.train_tokenizer``::

    python -m vqgen.pipelines.train_tokenizer --config configs/tokenizer/synthetic_ema.yaml --output-dir runs/tok

Schedules (``schedule.mode``):
- ``early``: quantize from step 0; the codebook starts random (``schedule.init=random``) or from k-means on
  the untrained encoder's outputs (``schedule.init=kmeans``).
- ``deferred``: ``schedule.ae_steps`` of continuous autoencoder training, then k-means on the trained
  encoder's outputs (gathered from every process, computed once, broadcast), then quantized training,
  optionally blended in over ``schedule.transition_steps`` (``z = a z_e + (1 - a) z_q``, ``a``: 1 -> 0).
  Quantizers with an implicit codebook (``fsq``, ``lfq``: nothing to initialise) train the continuous phase
  through ``quantizer.continuous`` and switch quantization on; see ``Capabilities.deferred``.
``train.steps`` counts all phases. Killed runs resume from the newest checkpoint with the same command.

The objective (``loss.*``, :mod:`tokenizer.losses`): reconstruction (L1 or L2), the quantizer loss, optionally
LPIPS (``loss.perceptual_weight``) and a PatchGAN (``loss.disc_weight``, from ``loss.disc_start``; by default
from the step quantization starts) with the adaptive weight. The discriminator has its own AdamW; both models
and both optimizers are ``prepare``d and checkpointed together (``model_1.safetensors`` / ``optimizer_1.bin``
in the checkpoints are the discriminator's); ``model/`` holds the tokenizer alone.

One update (the shared skeleton of :mod:`tokenizer.training`): ``grad_accum`` micro-batches, each
backpropagating the tokenizer's loss and, once the GAN is on, the discriminator's loss on the detached
reconstruction (the tokenizer's loss reaches the discriminator through its detached parameters only); gradients
all-reduced on the last micro-batch; then clip and step the tokenizer, then clip and step the discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vqgen.core import training
from vqgen.core.errors import warn
from vqgen.core.files import owns_folder
from vqgen.core.records import make_record
from vqgen.core.trainer import (
    Task,
    TrainConfig,
    Trainer,
    init_fingerprint,
    load_init_weights,
    optimizer_and_schedule,
    run_complete,
)
from vqgen.eval.codebook import all_code_distance, codebook_metrics
from vqgen.pipelines.common import entry_point, parse_cli
from vqgen.pipelines.stages import legacy_record
from vqgen.tokenizer.data import DataConfig, augmented, build_dataset, make_dataloader
from vqgen.tokenizer.discriminator import build_discriminator
from vqgen.tokenizer.losses import LossConfig, TokenizerLoss
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.monitor import fixed_batch, recon_due, write_recon_grid
from vqgen.tokenizer.perceptual import build_perceptual, random_trunk_warning
from vqgen.tokenizer.quantizers import registered_kinds, spec_of
from vqgen.tokenizer.stats import code_counts, live_code_distance


@dataclass
class ScheduleConfig:
    """When and how quantization starts."""

    mode: str = "early"  # "early" | "deferred"
    init: str = "random"  # early only: "random" | "kmeans" (k-means on the untrained encoder)
    ae_steps: int = 0  # deferred: continuous steps before quantization
    kmeans_batches: int = 20  # batches (per process) of encoder outputs for k-means
    transition_steps: int = 0  # deferred: soft blend length after ae_steps (0: hard switch)

    def validate(self) -> None:
        if self.mode not in ("early", "deferred"):
            raise ValueError(f"mode must be 'early' or 'deferred', got {self.mode!r}")
        if self.init not in ("random", "kmeans"):
            raise ValueError(f"init must be 'random' or 'kmeans', got {self.init!r}")
        if self.mode == "deferred" and self.ae_steps < 1:
            raise ValueError("deferred quantization needs ae_steps >= 1 continuous steps")
        if self.mode == "early" and (self.ae_steps or self.transition_steps):
            raise ValueError("ae_steps and transition_steps only apply to mode=deferred")
        if self.kmeans_batches < 1 or self.transition_steps < 0:
            raise ValueError("kmeans_batches must be >= 1 and transition_steps >= 0")


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """``train.*`` of a tokenizer run: the shared settings plus what only a tokenizer shows while it trains."""

    # RUN/recon/step_N.png (a fixed validation batch above its reconstructions) every N steps; 0: off
    recon_every: int = 0

    def validate(self) -> None:
        super().validate()
        if self.recon_every < 0:
            raise ValueError(f"recon_every must be >= 0 (0: no reconstruction grids), got {self.recon_every}")


@dataclass
class TokenizerRunConfig:
    """Everything one tokenizer run needs; saved as ``config.yaml`` in the run folder."""

    output_dir: str = "runs/tokenizer"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # fine-tune: start from the weights of another tokenizer run (its folder, model/ folder or a hub id); the
    # model settings must be that run's; the optimizer starts fresh
    init_from: str | None = None

    def validate(self) -> None:
        if self.data.image_size != self.model.image_size or self.data.channels != self.model.in_channels:
            raise ValueError(
                f"data gives {self.data.channels}x{self.data.image_size}x{self.data.image_size} images but the model "
                f"expects {self.model.in_channels}x{self.model.image_size}x{self.model.image_size}; set "
                "model.image_size/model.in_channels equal to data.image_size/data.channels"
            )
        kind = self.model.quantizer.kind
        caps = self.model.quantizer.spec().capabilities
        with_kmeans = ", ".join(k for k in registered_kinds() if spec_of(k).capabilities.kmeans_init)
        if self.schedule.mode == "early" and self.schedule.init == "kmeans" and not caps.kmeans_init:
            what = ("its codes are a fixed grid (an implicit codebook)" if not caps.learned_codebook
                    else "it chooses codes from learned logits, not the nearest codebook entry")
            raise ValueError(
                f"schedule.init=kmeans initialises a codebook by k-means, which model.quantizer.kind={kind} cannot "
                f"use: {what}. Use schedule.init=random, or a kind with k-means initialisation ({with_kmeans})"
            )
        if self.schedule.mode == "deferred" and caps.deferred() is None:
            raise ValueError(
                f"schedule.mode=deferred ends its continuous phase by k-means-initialising the codebook, which "
                f"model.quantizer.kind={kind} cannot use (its learned codebook cannot be set by k-means); use "
                f"schedule.mode=early with schedule.init=random for {kind}, or a kind with k-means initialisation "
                f"({with_kmeans}) or an implicit codebook (deferred = continuous phase, then the switch)"
            )
        if self.loss.uses_gan and self.model.image_size < self.loss.disc.min_image_size():
            raise ValueError(
                f"a {self.loss.disc.num_layers}-layer discriminator needs images of at least "
                f"{self.loss.disc.min_image_size()} px (got {self.model.image_size}); lower loss.disc.num_layers"
            )
        if self.init_from and (self.schedule.mode == "deferred" or self.schedule.init == "kmeans"):
            raise ValueError(
                f"init_from starts from trained weights, codebook included, which schedule.mode={self.schedule.mode} "
                f"schedule.init={self.schedule.init} would replace by k-means; use schedule.mode=early "
                "schedule.init=random to fine-tune"
            )
        if self.schedule.mode == "deferred" and self.schedule.ae_steps >= self.train.steps:
            raise ValueError(
                f"schedule.ae_steps ({self.schedule.ae_steps}) must be smaller than train.steps ({self.train.steps})"
            )


def quantized_steps(cfg: TokenizerRunConfig) -> int:
    """Optimizer steps of the quantized phase: what the quantizer's temperature schedule counts."""
    return cfg.train.steps - (cfg.schedule.ae_steps if cfg.schedule.mode == "deferred" else 0)


def schedule_warning(cfg: TokenizerRunConfig, quantizer) -> str | None:
    """A warning when the quantizer's temperature schedule is longer than the quantized phase (it would stop
    part of the way, at a temperature the configuration does not name); none for a constant temperature."""
    schedule = quantizer.schedule()
    steps = quantized_steps(cfg)
    if schedule is None or schedule[1] <= steps:
        return None
    name, length = schedule
    if quantizer.tau_at(steps) == quantizer.tau_at(length):  # constant (start == end): nothing is cut off
        return None
    return (f"model.quantizer.{name}={length} is longer than the {steps} quantized steps of this run, so the "
            f"temperature ends at {quantizer.tau_at(steps):.4g}, not at its end value; set "
            f"model.quantizer.{name}={steps} to run the whole schedule")


def rotation_warning(cfg: TokenizerRunConfig) -> str | None:
    """A warning for the rotation trick in a deferred run: in vqgen's quantizer study (README, "The quantizer
    family") VQ with the rotation trick diverged after the switch in every seed and EMA VQ lost codes;
    ``benchmarks/rotation_deferred.py`` traced the VQ case to the rotation and found beta = 1 stable."""
    if cfg.schedule.mode != "deferred" or not getattr(cfg.model.quantizer, "rotation_trick", False):
        return None
    beta = getattr(cfg.model.quantizer, "beta", None)
    beta = f" (beta={beta:g})" if beta is not None else ""
    return (f"model.quantizer.rotation_trick with schedule.mode=deferred{beta}: in "
            "vqgen's quantizer study this combination diverged after the switch to quantization at beta=0.25 (VQ: "
            "every seed collapsed to one or two codes, the rotated gradient turning the encoder outputs away from "
            "their codes; EMA: codes in use fell steadily); VQ with beta=1 stayed stable in all three seeds "
            "(benchmarks/rotation_deferred.py); watch the loss after schedule.ae_steps, raise model.quantizer.beta, "
            "or use the rotation trick with schedule.mode=early")


def phase_at(step: int, schedule: ScheduleConfig) -> tuple[str, float]:
    """(phase, alpha) for an optimizer step: ``ae`` (continuous) or ``quantize`` with blend weight alpha."""
    if schedule.mode == "early":
        return "quantize", 0.0
    if step < schedule.ae_steps:
        return "ae", 1.0
    if schedule.transition_steps:
        return "quantize", max(0.0, 1.0 - (step - schedule.ae_steps) / schedule.transition_steps)
    return "quantize", 0.0


@torch.no_grad()
def init_codebook_from_encoder(model: VQVAE, loader, batches: int, accelerator) -> int:
    """k-means-initialise the codebook(s) on ``batches`` batches of encoder outputs from every process.

    The quantizer gathers the vectors across processes, computes k-means once and broadcasts, so all
    replicas hold the same codebook. Returns the number of local vectors used.
    """
    was_training = model.training
    model.eval()
    chunks = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        z = model.encode_latents(batch["image"])  # (B, h, w, D)
        chunks.append(z.reshape(-1, z.shape[-1]).float())
    vectors = torch.cat(chunks)
    model.quantizer.init_codebook(vectors)
    model.train(was_training)
    accelerator.wait_for_everyone()
    return vectors.shape[0]


@torch.no_grad()
def evaluate_tokenizer(model: VQVAE, loader, accelerator, max_batches: int = 0) -> dict:
    """Reconstruction and codebook metrics over the whole loader (all processes), eval mode.

    See ``eval.codebook.codebook_metrics``: MSE on images scaled to [0, 1], mean per-image PSNR, usage and
    perplexity (per codebook for a ladder), live code distance, selection of a ladder.
    """
    raw = accelerator.unwrap_model(model)
    batches = (batch["image"] for i, batch in enumerate(loader) if not max_batches or i < max_batches)
    return codebook_metrics(raw, batches, gather=accelerator.gather_for_metrics)


LOGGED_DISTANCE_CODES = 2048  # codes per codebook used for the logged (not the final) code distance


def build_gan(cfg: TokenizerRunConfig):
    """(discriminator wrapped in ``RealFake``, its AdamW) or (None, None) without a GAN."""
    if not cfg.loss.uses_gan:
        return None, None
    disc_cfg = cfg.loss.disc
    # its own seed: adding a discriminator leaves the tokenizer's initialisation and the data order unchanged
    disc = build_discriminator(cfg.model.in_channels, disc_cfg, seed=cfg.train.seed + 7919)
    optimizer = training.make_optimizer(disc, disc_cfg.lr or cfg.train.lr, disc_cfg.betas, disc_cfg.weight_decay,
                                        fused=cfg.train.fused)
    return disc, optimizer


def fake_logits(disc, recon: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits of ``recon`` for the tokenizer's loss: through the unwrapped module with its
    parameters detached, so this loss sends gradients to the reconstruction only (none to the discriminator,
    and no data-parallel hook runs)."""
    net = disc.discriminator
    params = {name: p.detach() for name, p in net.named_parameters()}
    return torch.func.functional_call(net, params, (recon,))


class TokenizerTask(Task):
    """Stage 1 as a trainer task: the VQ-VAE (and the PatchGAN once it starts), deferred phases, k-means."""

    name = "tokenizer"
    monitor = "val_recon_mse"

    def __init__(self, cfg: TokenizerRunConfig):
        self.cfg = cfg

    def setup(self, trainer: Trainer) -> None:
        cfg = self.cfg
        accelerator = trainer.accelerator
        train_ds = build_dataset(cfg.data, "train")
        val_ds = build_dataset(cfg.data, "validation")
        model = VQVAE(cfg.model)
        if cfg.init_from and not trainer.resuming:
            self.init_record = load_init_weights(model, cfg.init_from, "tokenizer")
            accelerator.print(f"tokenizer: weights from {cfg.init_from} (fine-tuning; fresh optimizer)")
        for warning in (schedule_warning(cfg, model.quantizer), rotation_warning(cfg)):
            if warning:
                warn(accelerator, warning)
        optimizer, scheduler = optimizer_and_schedule(model, cfg.train)
        perceptual, self.perceptual_info = (build_perceptual(cfg.loss.perceptual) if cfg.loss.uses_perceptual
                                            else (None, None))
        if random_trunk_warning(self.perceptual_info):
            warn(accelerator, random_trunk_warning(self.perceptual_info))
        self.loss_fn = TokenizerLoss(cfg.loss, perceptual).to(accelerator.device)  # frozen; never saved
        disc, disc_optimizer = build_gan(cfg)
        # data.random_crop / data.hflip: the training view only (k-means, validation and the grids see plain images)
        train_loader = make_dataloader(augmented(train_ds, cfg.data, cfg.train.seed), cfg.train.batch_size,
                                       shuffle=True, seed=cfg.train.seed, drop_last=True,
                                       num_workers=cfg.train.num_workers)
        self.recon_images = fixed_batch(val_ds) if cfg.train.recon_every else None
        val_loader = make_dataloader(val_ds, cfg.train.batch_size, shuffle=False)
        kmeans_loader = make_dataloader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + 1)
        if len(train_loader) == 0:
            raise ValueError(
                f"the training split has {len(train_ds)} images, fewer than one batch of {cfg.train.batch_size}; "
                "lower train.batch_size or use more data"
            )
        model, optimizer, self.train_loader, self.val_loader, self.kmeans_loader = trainer.prepare(
            model, optimizer, train_loader, val_loader, kmeans_loader)
        # the schedule the GAN starts at (None: no GAN); the discriminator trains from then on
        self.gan_from = self.loss_fn.gan_starts(cfg.schedule.ae_steps if cfg.schedule.mode == "deferred" else 0)
        trainer.add_trained("tokenizer", model, optimizer, scheduler)
        self.disc = self.raw_disc = None
        if disc is not None:  # prepared after the tokenizer
            self.disc, disc_optimizer = trainer.prepare(disc, disc_optimizer)
            self.raw_disc = trainer.unwrap(self.disc)
            trainer.add_trained("discriminator", self.disc, disc_optimizer, active=lambda step: step >= self.gan_from)
        trainer.main = model
        self.raw: VQVAE = trainer.unwrap(model)
        self.forward = trainer.forward_fn(model)

    def on_start(self, trainer: Trainer) -> None:
        cfg = self.cfg
        if cfg.schedule.mode == "early" and cfg.schedule.init == "kmeans":
            n = init_codebook_from_encoder(self.raw, self.kmeans_loader, cfg.schedule.kmeans_batches,
                                           trainer.accelerator)
            trainer.accelerator.print(f"codebook initialised by k-means on {n} vectors of the untrained encoder "
                                      "(per process)")

    def before_update(self, trainer: Trainer, step: int) -> None:
        cfg = self.cfg
        self.phase, self.alpha = phase_at(step, cfg.schedule)
        self.gan_on = self.gan_from is not None and step >= self.gan_from
        if cfg.schedule.mode == "deferred" and step == cfg.schedule.ae_steps:
            if self.raw.quantizer.capabilities.deferred() == "kmeans":
                n = init_codebook_from_encoder(self.raw, self.kmeans_loader, cfg.schedule.kmeans_batches,
                                               trainer.accelerator)
                trainer.accelerator.print(f"step {step}: continuous phase done; codebook k-means on {n} vectors "
                                          "per process")
            else:  # an implicit codebook: nothing to initialise
                trainer.accelerator.print(f"step {step}: continuous phase done; quantization switched on")

    def micro_step(self, trainer: Trainer, batch, step: int) -> dict:
        images = batch["image"]
        output = self.forward(images, quantize=self.phase == "quantize", alpha=self.alpha)
        with trainer.accelerator.autocast():  # LPIPS is not prepared: it follows the launcher's precision here
            gen = self.loss_fn.generator(
                images, output.recon, output.quant.loss if output.quant is not None else None,
                logits_fake=fake_logits(self.raw_disc, output.recon) if self.gan_on else None,
                last_layer=self.raw.last_layer() if self.gan_on else None,
            )
        trainer.backward(gen.loss)
        values = {"loss": gen.loss, "recon_mse": gen.terms["recon_mse"] / 4.0}  # recon_mse on [0, 1]
        if self.cfg.loss.recon == "l1":
            values["recon_l1"] = gen.terms["recon_loss"]
        values.update({k: v for k, v in gen.terms.items() if k not in ("recon_mse", "recon_loss", "quantizer_loss")})
        if self.gan_on:  # the discriminator learns on the detached reconstruction
            logits_real, logits_fake = self.disc(images, output.recon.detach())
            d_loss, d_terms = self.loss_fn.discriminator(logits_real, logits_fake)
            trainer.backward(d_loss)
            values.update(d_terms)
        self.output = output
        return values

    def before_optimizer(self, trainer: Trainer, step: int, logging: bool) -> None:
        if logging and self.raw.quantizer.capabilities.codebook_selection:
            # before clipping: what the selector's parameters get from this batch
            self.selector_grad = _grad_norm(self.raw.quantizer.selector_parameters())

    def after_update(self, trainer: Trainer, step: int) -> None:
        if self.phase == "quantize":
            self.raw.quantizer.step_schedule()  # temperature schedules count optimizer steps (no host sync)
        done = step + 1  # optimizer steps taken (the grid files count from 1, as the checkpoints do)
        if recon_due(done, self.cfg.train.recon_every, self.cfg.train.steps):
            write_recon_grid(self.raw, self.recon_images, trainer.output_dir, done, self.phase == "quantize",
                             self.alpha, trainer.accelerator)

    def log_record(self, trainer: Trainer, step: int) -> dict:
        record = step_metrics(self.raw, self.output, trainer.accelerator, self.phase, self.alpha)
        if self.phase == "quantize" and self.raw.quantizer.capabilities.codebook_selection:
            # the norm, and the root mean square per parameter: what Adam's eps (1e-8) compares with
            numel = sum(p.numel() for p in self.raw.quantizer.selector_parameters())
            record["selector_grad_norm"] = float(self.selector_grad)
            record["selector_grad_rms"] = float(self.selector_grad) / numel**0.5
        return record

    def evaluate(self, trainer: Trainer, step: int) -> dict:
        metrics = evaluate_tokenizer(trainer.main, self.val_loader, trainer.accelerator, self.cfg.train.eval_batches)
        return {f"val_{k}": v for k, v in metrics.items()}

    def finish(self, trainer: Trainer, step: int) -> dict:
        cfg = self.cfg
        accelerator = trainer.accelerator
        summary = evaluate_tokenizer(trainer.main, self.val_loader, accelerator, cfg.train.eval_batches)
        summary.update(
            images_per_second=trainer.samples_trained / trainer.train_seconds if trainer.train_seconds > 0 else None,
            kind=cfg.model.quantizer.kind,
            schedule=cfg.schedule.mode,
            replica_max_abs_diff=replica_max_abs_diff(self.raw, accelerator),
        )
        if cfg.init_from:
            summary["init_from"] = getattr(self, "init_record", None) or {"source": cfg.init_from}
        summary.update(loss_summary(cfg, self.perceptual_info, self.gan_from, self.raw_disc, accelerator))
        return summary


def tokenizer_stage_record(cfg: TokenizerRunConfig) -> dict:
    """The stage record of a tokenizer run: its config and, when it starts from another run's weights, their
    sha256."""
    inputs = {"init_from": init_fingerprint(cfg.init_from, "tokenizer")} if cfg.init_from else {}
    return make_record("tokenizer", cfg, inputs)


def stage_record(cfg: TokenizerRunConfig, run: Path) -> dict:
    return tokenizer_stage_record(cfg)


def stage_complete(cfg: TokenizerRunConfig, run: Path) -> bool:
    return run_complete(Path(cfg.output_dir) / "summary.json", cfg.train.steps)


def run_stage(cfg: TokenizerRunConfig, run: Path) -> dict:
    return train_tokenizer(cfg)


@owns_folder(lambda cfg, *args, **kwargs: cfg.output_dir, "tokenizer")
def train_tokenizer(cfg: TokenizerRunConfig, stop_after: int | None = None) -> dict:
    """Train (or resume, or continue) one tokenizer run into ``cfg.output_dir``; returns the summary dict.

    ``stop_after`` ends this invocation after that many optimizer steps in total (as if the job were
    preempted); rerunning resumes from the newest checkpoint.
    """
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    from vqgen.pipelines.stages import IGNORED

    out = Path(cfg.output_dir)
    trainer = Trainer(
        TokenizerTask(cfg), cfg.train, out, config=cfg, record=tokenizer_stage_record(cfg),
        record_cls=TokenizerRunConfig, ignored=IGNORED["tokenizer"],
        legacy_record=lambda: legacy_record("tokenizer", out),
        accelerator_kwargs={
            "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
            # the quantizer is idle in the continuous phase, so DDP must tolerate unused parameters
            "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
        },
    )
    return trainer.fit(stop_after)


def loss_summary(cfg: TokenizerRunConfig, perceptual_info: dict | None, gan_from: int | None, raw_disc,
                 accelerator) -> dict:
    """What the objective was, for ``summary.json``: the loss terms, the perceptual network and its weights
    (with the caveat of a random trunk), the discriminator's start and its replica agreement."""
    out: dict = {"loss": {"recon": cfg.loss.recon, "perceptual_weight": cfg.loss.perceptual_weight,
                          "disc_weight": cfg.loss.disc_weight}}
    if perceptual_info is not None:
        out["perceptual"] = perceptual_info
    if gan_from is not None:
        out["loss"].update(disc_start=gan_from, disc_loss=cfg.loss.disc_loss, adaptive_weight=cfg.loss.adaptive_weight)
        out["discriminator_replica_max_abs_diff"] = replica_max_abs_diff(raw_disc, accelerator)
    return out


@torch.no_grad()
def replica_max_abs_diff(model: torch.nn.Module, accelerator) -> float:
    """Largest difference between any replica's parameters/buffers and the main process's (0.0 = identical)."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    if accelerator.num_processes == 1:
        return 0.0
    everyone = accelerator.gather(flat[None])  # (P, numel)
    return float((everyone - everyone[:1]).abs().max())


def _grad_norm(params) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` (0 where none), as a device tensor (no host sync)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _batch_live_distance(model: VQVAE, indices: torch.Tensor) -> float:
    """Live code distance of one batch's ids: per codebook, weighted by how many ids each codebook got."""
    q = model.quantizer
    sizes = q.codebook_sizes
    counts = code_counts(indices, sum(sizes)).split(sizes)
    total, weighted = 0.0, 0.0
    for i, c in enumerate(counts):
        used = (c > 0).nonzero().squeeze(1)
        n = float(c.sum())
        weighted += float(live_code_distance(q.code_vectors(i, used), c[used])) * n
        total += n
    return weighted / max(total, 1.0)


@torch.no_grad()
def step_metrics(model: VQVAE, output, accelerator, phase: str, alpha: float) -> dict:
    """Batch statistics of the last micro-batch of a logged step (averaged over processes): the phase, perplexity,
    usage, code distances, the selection of a ladder, temperatures, the blend weight."""
    record: dict = {
        "phase": phase,
        "perplexity": None,
        "usage": None,
        "code_distance": all_code_distance(model, LOGGED_DISTANCE_CODES),
    }
    if phase == "quantize" and output.quant is not None:
        stats = output.quant.stats
        record["perplexity"] = float(accelerator.reduce(stats["perplexity"].detach().float(), reduction="mean"))
        record["usage"] = float(accelerator.reduce(stats["usage"].detach().float(), reduction="mean"))
        record["live_code_distance"] = _batch_live_distance(model, output.quant.indices)
        if "selection" in stats:
            record["selection"] = accelerator.reduce(stats["selection"].detach().float(), reduction="mean").tolist()
        if "tau" in stats:
            record["tau"] = float(stats["tau"])
        if alpha > 0:
            record["alpha"] = alpha
    return record


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = parse_cli(TokenizerRunConfig, argv, "Train a VQ-VAE tokenizer (stage 1).")
    summary = train_tokenizer(cfg)
    return summary


if __name__ == "__main__":
    main()
