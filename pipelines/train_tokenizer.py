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

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from vqgen.pipelines.common import (
    CheckpointManager,
    MetricsLogger,
    TrainConfig,
    check_output_dir,
    entry_point,
    fail_on_nonfinite,
    finish_run,
    make_accelerator,
    training_forward,
    batch_stream,
    parse_cli,
    resume_latest,
    show_progress,
    warn,
    write_run_config,
)
from vqgen.pipelines.stages import STAGE_RECORD, check_record, make_record
from vqgen.core import training
from vqgen.tokenizer.data import DataConfig, augmented, build_dataset, make_dataloader
from vqgen.tokenizer.discriminator import build_discriminator
from vqgen.tokenizer.losses import LossConfig, TokenizerLoss
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.monitor import fixed_batch, recon_due, write_recon_grid
from vqgen.tokenizer.perceptual import build_perceptual, random_trunk_warning
from vqgen.tokenizer.quantizers import registered_kinds, spec_of
from vqgen.eval.codebook import all_code_distance, codebook_metrics
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
        if self.schedule.mode == "deferred" and self.schedule.ae_steps >= self.train.steps:
            raise ValueError(
                f"schedule.ae_steps ({self.schedule.ae_steps}) must be smaller than train.steps ({self.train.steps})"
            )


def quantized_steps(cfg: TokenizerRunConfig) -> int:
    """Optimizer steps of the quantized phase: what the quantizer's temperature schedule counts."""
    return cfg.train.steps - (cfg.schedule.ae_steps if cfg.schedule.mode == "deferred" else 0)


def schedule_warning(cfg: TokenizerRunConfig, quantizer) -> str | None:
    """A warning when the quantizer's temperature schedule is longer than the quantized phase (it would stop
    part of the way, at a temperature the configuration does not name)."""
    schedule = quantizer.schedule()
    steps = quantized_steps(cfg)
    if schedule is None or schedule[1] <= steps:
        return None
    name, length = schedule
    return (f"model.quantizer.{name}={length} is longer than the {steps} quantized steps of this run, so the "
            f"temperature ends at {quantizer.tau_at(steps):.4g}, not at its end value; set "
            f"model.quantizer.{name}={steps} to run the whole schedule")


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


def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    """AdamW (weight decay on weight tensors only) and the warm-up/cosine or constant schedule, from the shared
    skeleton (:mod:`tokenizer.training`)."""
    optimizer = training.make_optimizer(model, train.lr, train.betas, train.weight_decay)
    return optimizer, training.make_schedule(optimizer, train.lr_schedule, train.steps, train.warmup_steps)


def build_gan(cfg: TokenizerRunConfig):
    """(discriminator wrapped in ``RealFake``, its AdamW) or (None, None) without a GAN."""
    if not cfg.loss.uses_gan:
        return None, None
    disc_cfg = cfg.loss.disc
    # its own seed: adding a discriminator leaves the tokenizer's initialisation and the data order unchanged
    disc = build_discriminator(cfg.model.in_channels, disc_cfg, seed=cfg.train.seed + 7919)
    optimizer = training.make_optimizer(disc, disc_cfg.lr or cfg.train.lr, disc_cfg.betas, disc_cfg.weight_decay)
    return disc, optimizer


def fake_logits(disc, recon: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits of ``recon`` for the tokenizer's loss: through the unwrapped module with its
    parameters detached, so this loss sends gradients to the reconstruction only (none to the discriminator,
    and no data-parallel hook runs)."""
    net = disc.discriminator
    params = {name: p.detach() for name, p in net.named_parameters()}
    return torch.func.functional_call(net, params, (recon,))


def train_tokenizer(cfg: TokenizerRunConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) one tokenizer run into ``cfg.output_dir``; returns the summary dict.

    ``stop_after`` ends this invocation after that many optimizer steps in total (as if the job were
    preempted); rerunning resumes from the newest checkpoint.
    """
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    out = check_output_dir(cfg.output_dir)
    checkpoints = CheckpointManager(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    stage_record = make_record("tokenizer", cfg)
    if checkpoints.all():  # never continue a checkpoint of another config
        check_record(out / STAGE_RECORD, stage_record, TokenizerRunConfig, f"{out} holds a tokenizer checkpoint",
                     f"resuming it would mix two configs. Use another --output-dir, or delete {out} to start over "
                     "(vqgen run: --force tokenizer)", legacy_folder=out)
    accelerator = make_accelerator(
        # accumulation is the shared skeleton's (training.micro_batches), so the Accelerator runs with grad_accum=1
        dataclasses.replace(cfg.train, grad_accum=1),
        out,
        "tokenizer",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        # the quantizer is idle in the continuous phase, so DDP must tolerate unused parameters
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    write_run_config(cfg, out, accelerator, stage_record, resuming=bool(checkpoints.all()))
    train_ds = build_dataset(cfg.data, "train")
    val_ds = build_dataset(cfg.data, "validation")
    model = VQVAE(cfg.model)
    long_schedule = schedule_warning(cfg, model.quantizer)
    if long_schedule:
        warn(accelerator, long_schedule)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    perceptual, perceptual_info = build_perceptual(cfg.loss.perceptual) if cfg.loss.uses_perceptual else (None, None)
    if random_trunk_warning(perceptual_info):
        warn(accelerator, random_trunk_warning(perceptual_info))
    loss_fn = TokenizerLoss(cfg.loss, perceptual).to(accelerator.device)  # frozen; rebuilt from the config, never saved
    disc, disc_optimizer = build_gan(cfg)
    # data.random_crop / data.hflip: the training view only (k-means, validation and the grids see plain images)
    train_loader = make_dataloader(augmented(train_ds, cfg.data, cfg.train.seed), cfg.train.batch_size, shuffle=True,
                                   seed=cfg.train.seed, drop_last=True, num_workers=cfg.train.num_workers)
    val_loader = make_dataloader(val_ds, cfg.train.batch_size, shuffle=False)
    kmeans_loader = make_dataloader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + 1)
    if len(train_loader) == 0:
        raise ValueError(
            f"the training split has {len(train_ds)} images, fewer than one batch of {cfg.train.batch_size}; "
            "lower train.batch_size or use more data"
        )
    model, optimizer, train_loader, val_loader, kmeans_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, kmeans_loader
    )
    if disc is not None:  # prepared after the tokenizer: its files in a checkpoint are model_1 / optimizer_1
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    # the schedule is stepped by hand once per optimizer step (a prepared scheduler would step once per
    # process), and checkpointed with the rest of the state
    accelerator.register_for_checkpointing(scheduler)
    raw: VQVAE = accelerator.unwrap_model(model)
    forward = training_forward(model, cfg.train)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    recon_images = fixed_batch(val_ds) if cfg.train.recon_every else None

    start = resume_latest(accelerator, checkpoints)
    if start == 0 and cfg.schedule.mode == "early" and cfg.schedule.init == "kmeans":
        n = init_codebook_from_encoder(raw, kmeans_loader, cfg.schedule.kmeans_batches, accelerator)
        accelerator.print(f"codebook initialised by k-means on {n} vectors of the untrained encoder (per process)")
    logger = MetricsLogger(out / "metrics.jsonl", accelerator, resume_step=start)

    total = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    accum = cfg.train.grad_accum
    watch = training.NonFiniteWatch(accelerator.device)  # first step with a non-finite loss (no host sync)
    loss_sum = torch.zeros((), device=accelerator.device)
    progress = tqdm(total=cfg.train.steps, initial=start, disable=not show_progress(accelerator), desc="tokenizer")
    model.train()
    if disc is not None:
        disc.train()
    gan_from = loss_fn.gan_starts(cfg.schedule.ae_steps if cfg.schedule.mode == "deferred" else 0)
    trained = [model] + ([disc] if disc is not None else [])

    stream = batch_stream(accelerator, train_loader, start, accum)
    step = start
    images_trained, t_train = 0, 0.0
    while step < total:
        phase, alpha = phase_at(step, cfg.schedule)
        gan_on = gan_from is not None and step >= gan_from
        if cfg.schedule.mode == "deferred" and step == cfg.schedule.ae_steps:
            if raw.quantizer.capabilities.deferred() == "kmeans":
                n = init_codebook_from_encoder(raw, kmeans_loader, cfg.schedule.kmeans_batches, accelerator)
                accelerator.print(f"step {step}: continuous phase done; codebook k-means on {n} vectors per process")
            else:  # an implicit codebook: nothing to initialise
                accelerator.print(f"step {step}: continuous phase done; quantization switched on")
        t0 = time.perf_counter()
        logging_now = training.log_due(step + 1, total, cfg.train.log_every)
        d_terms: dict = {}
        for _, batch in training.micro_batches(accelerator, trained, stream, accum):
            images = batch["image"]
            output = forward(images, quantize=phase == "quantize", alpha=alpha)
            with accelerator.autocast():  # LPIPS is not prepared: it follows the launcher's precision here
                gen = loss_fn.generator(
                    images, output.recon, output.quant.loss if output.quant is not None else None,
                    logits_fake=fake_logits(raw_disc, output.recon) if gan_on else None,
                    last_layer=raw.last_layer() if gan_on else None,
                )
            accelerator.backward(gen.loss / accum)
            watch.update(gen.loss, step + 1)
            if gan_on:  # the discriminator learns on the detached reconstruction
                logits_real, logits_fake = disc(images, output.recon.detach())
                d_loss, d_terms = loss_fn.discriminator(logits_real, logits_fake)
                accelerator.backward(d_loss / accum)
                watch.update(d_loss, step + 1)
            images_trained += images.shape[0] * accelerator.num_processes
        if logging_now and raw.quantizer.capabilities.codebook_selection:
            # before clipping: what the selector's parameters would get from this batch
            selector_grad = _grad_norm(raw.quantizer.selector_parameters())
        if cfg.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if gan_on:  # after the tokenizer's step (fp16: each clip unscales only gradients not yet stepped)
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(disc.parameters(), cfg.train.max_grad_norm)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
        if phase == "quantize":
            raw.quantizer.step_schedule()  # temperature schedules count optimizer steps (device op, no sync)
        step += 1
        loss_sum += gen.loss.detach()
        t_train += time.perf_counter() - t0
        progress.update(1)

        is_last = step == total
        if training.log_due(step, total, cfg.train.log_every) or step % cfg.train.checkpoint_every == 0:
            first_bad = watch.first(accelerator.reduce)  # never checkpoint a NaN state
            if first_bad >= 0:
                fail_on_nonfinite(float("nan"), first_bad, checkpoints)
        if training.log_due(step, total, cfg.train.log_every):
            record = step_metrics(raw, output, gen.terms, accelerator, phase, alpha)
            for key, value in {**gen.terms, **d_terms}.items():
                if key not in ("recon_mse", "recon_loss", "quantizer_loss"):
                    record[key] = float(accelerator.reduce(value.float(), reduction="mean"))
            if cfg.loss.recon == "l1":
                record["recon_l1"] = float(accelerator.reduce(gen.terms["recon_loss"].float(), reduction="mean"))
            if phase == "quantize" and raw.quantizer.capabilities.codebook_selection:
                # the norm, and the root mean square per parameter: what Adam's eps (1e-8) compares with
                numel = sum(p.numel() for p in raw.quantizer.selector_parameters())
                record["selector_grad_norm"] = float(selector_grad)
                record["selector_grad_rms"] = float(selector_grad) / numel**0.5
            record["loss"] = float(accelerator.reduce(loss_sum, reduction="mean")) / max(
                1, training.steps_since_log(step, cfg.train.log_every))
            record["lr"] = scheduler.get_last_lr()[0]
            loss_sum.zero_()
            logger.log(record, step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", phase=phase)
        if recon_due(step, cfg.train.recon_every, cfg.train.steps):
            write_recon_grid(raw, recon_images, out, step, phase == "quantize", alpha, accelerator)
        if step % cfg.train.checkpoint_every == 0 or is_last:
            checkpoints.save(accelerator, step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not is_last:
            logger.log({f"val_{k}": v for k, v in evaluate_tokenizer(model, val_loader, accelerator, cfg.train.eval_batches).items()}, step)
    progress.close()

    if step < cfg.train.steps:  # stopped early on purpose; the checkpoint above lets the next run resume
        accelerator.end_training()
        return {"steps": step, "stopped_early": True}
    summary = evaluate_tokenizer(model, val_loader, accelerator, cfg.train.eval_batches)
    summary.update(
        steps=step,
        images_per_second=images_trained / t_train if t_train > 0 else None,
        kind=cfg.model.quantizer.kind,
        schedule=cfg.schedule.mode,
        num_processes=accelerator.num_processes,
        replica_max_abs_diff=replica_max_abs_diff(raw, accelerator),
    )
    summary.update(loss_summary(cfg, perceptual_info, gan_from, raw_disc, accelerator))
    return finish_run(accelerator, raw, summary, out, card={"training_config": cfg})


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
def step_metrics(model: VQVAE, output, terms: dict, accelerator, phase: str, alpha: float) -> dict:
    """The logged record for one step (batch statistics averaged over processes); ``terms`` are the loss terms
    of :meth:`TokenizerLoss.generator` (``recon_mse`` is on the [-1, 1] scale, logged on [0, 1])."""
    record: dict = {
        "phase": phase,
        "recon_mse": float(accelerator.reduce(terms["recon_mse"], reduction="mean")) / 4.0,
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
