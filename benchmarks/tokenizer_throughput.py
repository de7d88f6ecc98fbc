"""Tokenizer training throughput (images/s) of the papers' preset, and the 256-px VQGAN preset's cost.

Papers' preset (32x32 RGB, batch 64): times full optimizer steps of the tokenizer stage's own task (forward,
quantizer update, backward, clipping, AdamW: ``TokenizerTask`` under the trainer, MSE-only loss) of ``ema``
(N = 512, D = 128) and ``adaptive`` (the W = 65536 ladder of 8 codebooks) in one run, interleaved, median over
repeats, and reports the ratio adaptive/fixed.

256-px rows (``--res256``): the VQ-16-like preset of ``configs/tokenizer/imagenet256_vqgan.yaml`` (vqgan
architecture, 16x downsampling, VQ 16384 x 8): a training step with the MSE-only loss and one with the full VQGAN
loss (LPIPS with a random VGG16 trunk, which costs what the real one does, + PatchGAN with the adaptive weight, the
discriminator's step included) at ``--batch-256`` images, and ``encode`` / ``decode`` of ``--infer-256`` images
(chunks of ``tokenizer.model.INFERENCE_PIXELS``). Each row gives images/s and the peak memory of one call: on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU the resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident size before the call, in a separate process with glibc's mmap
threshold pinned at 64 KiB (as ``benchmarks/quantizer_speed.py``), so freed tensors leave the high-water mark.
Measured on whatever device is available::

    python benchmarks/tokenizer_throughput.py --threads 2 --steps 10 --repeats 5 --res256 --json bench_tok.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from peak_memory import peak_mb, pin_mmap_threshold  # benchmarks/peak_memory.py
from vqgen.core.trainer import task_step
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, TokenizerTask, TokenizerTrainConfig
from vqgen.tokenizer.data import DataConfig
from vqgen.tokenizer.losses import LossConfig
from vqgen.tokenizer.model import ModelConfig
from vqgen.tokenizer.quantizers import QuantizerConfig

PRESETS = {
    "ema 512x128": QuantizerConfig(kind="ema", codebook_size=512, dim=128),
    "adaptive W=65536": QuantizerConfig(kind="adaptive", dim=128, capacity=65536),
}


def tokenizer_step(model: ModelConfig, images: torch.Tensor, loss: LossConfig | None = None, fused: bool = False,
                   compiled: bool = False):
    """One optimizer update of the tokenizer stage's own task (``TokenizerTask`` under the trainer: AdamW with
    clipping at 1.0, the configured loss, the discriminator's step once a GAN is on; ``train.fused``,
    ``train.compile`` as given) on ``images``, as a callable; ``step.trainer`` holds the models."""
    n, size = images.shape[0], images.shape[-1]
    cfg = TokenizerRunConfig(
        data=DataConfig(source="synthetic", image_size=size, channels=model.in_channels, num_train=n,
                        num_validation=n, num_test=n),
        model=model, loss=loss or LossConfig(),
        train=TokenizerTrainConfig(lr=1e-4, batch_size=n, trackers=[], fused=fused, compile=compiled),
    )
    return task_step(TokenizerTask(cfg), cfg.train, {"image": images})


def time_steps(step, images: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` training steps."""
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def vq16_config(image_size: int = 256) -> ModelConfig:
    """The model section of configs/tokenizer/imagenet256_vqgan.yaml."""
    return ModelConfig(arch="vqgan", image_size=image_size, hidden=128, channel_mult=[1, 1, 2, 2, 4], num_res_layers=2,
                       downsample=16, quantizer=QuantizerConfig(kind="vq", codebook_size=16384, dim=8, cosine=True))


def res256_operations(batch: int, infer: int, device: str, image_size: int = 256,
                      config: ModelConfig | None = None) -> dict:
    """Name -> (closure, images per call) for the 256-px rows (``config``: another model, e.g. a tiny one)."""
    from vqgen.tokenizer.perceptual import PerceptualConfig

    torch.manual_seed(0)
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    model_cfg = config or vq16_config(image_size)
    train_mse = tokenizer_step(model_cfg, images)
    gan_cfg = LossConfig(perceptual_weight=1.0, perceptual=PerceptualConfig(pretrained=False), disc_weight=0.5,
                         disc_start=0)
    train_vqgan = tokenizer_step(model_cfg, images, gan_cfg)
    model = train_mse.trainer.unwrap(train_mse.trainer.main)

    many = torch.rand(infer, 3, image_size, image_size, device=device) * 2 - 1
    ids = model.encode(many[:1]).expand(infer, -1, -1).contiguous()
    return {
        "train step, MSE only": (train_mse, batch),
        "train step, L2 + LPIPS + PatchGAN (adaptive weight)": (train_vqgan, batch),
        "encode": (lambda: model.encode(many), infer),
        "decode": (lambda: model.decode(ids), infer),
    }


def _res256_peaks(batch: int, infer: int, threads: int, device: str, image_size: int) -> dict:
    torch.set_num_threads(threads)
    if device == "cpu":
        pin_mmap_threshold()  # large allocations return to the OS, so the high-water mark follows live tensors
    ops = res256_operations(batch, infer, device, image_size)
    peaks = {}
    for name, (fn, _) in ops.items():
        fn()  # warm-up: optimizer states, one-time allocations
        peaks[name] = peak_mb(fn, device)
    return peaks


def res256_rows(batch: int, infer: int, repeats: int, threads: int, device: str, image_size: int = 256) -> list[dict]:
    """Images/s (median of ``repeats`` calls after a warm-up) and peak MiB of each 256-px operation."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        peaks = pool.submit(_res256_peaks, batch, infer, threads, device, image_size).result()
    torch.set_num_threads(threads)
    rows = []
    for name, (fn, n) in res256_operations(batch, infer, device, image_size).items():
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        med = statistics.median(times)
        rows.append({"preset": f"vq16 {image_size}px", "operation": name, "images": n,
                     "images_per_second": n / med, "seconds_per_call": med, "peak_mb": peaks[name]})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--res256", action="store_true", help="also the 256-px VQGAN rows")
    parser.add_argument("--res256-only", action="store_true", help="only the 256-px rows")
    parser.add_argument("--batch-256", type=int, default=2, help="images per 256-px training step")
    parser.add_argument("--infer-256", type=int, default=32, help="images per 256-px encode / decode call")
    parser.add_argument("--repeats-256", type=int, default=2)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"device": device, "threads": args.threads, "platform": platform.processor() or platform.machine(),
            "torch": torch.__version__, "load_average": os.getloadavg()}
    if args.res256_only:
        rows256 = res256_rows(args.batch_256, args.infer_256, args.repeats_256, args.threads, device)
        _print_256(rows256, meta)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows_256": rows256}, f, indent=2)
        return rows256
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1
    setups = {}
    for name, qcfg in PRESETS.items():
        setups[name] = tokenizer_step(ModelConfig(quantizer=qcfg), images)
        time_steps(setups[name], images, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, step in setups.items():
            times[name].append(time_steps(step, images, args.steps))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"quantizer": name, "images_per_second": args.batch_size * args.steps / med,
                     "ms_per_step": 1000 * med / args.steps})
    ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print(f"device={device} threads={args.threads} batch={args.batch_size} steps={args.steps} repeats={args.repeats}")
    print(f"{'quantizer':<20} {'images/s':>10} {'ms/step':>10}")
    for r in rows:
        print(f"{r['quantizer']:<20} {r['images_per_second']:>10.1f} {r['ms_per_step']:>10.1f}")
    print(f"throughput ratio adaptive / fixed: {ratio:.3f}")
    rows256 = res256_rows(args.batch_256, args.infer_256, args.repeats_256, args.threads, device) if args.res256 else []
    if rows256:
        _print_256(rows256, meta)
    if args.json:
        meta.update(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, ratio_adaptive_over_fixed=ratio)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, **({"rows_256": rows256} if rows256 else {})}, f, indent=2)
    return rows + rows256


def _print_256(rows: list[dict], meta: dict) -> None:
    print(f"256 px, device={meta['device']} threads={meta['threads']} load={meta['load_average'][0]:.1f}")
    print(f"{'operation':<52} {'images':>6} {'images/s':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['operation']:<52} {r['images']:>6} {r['images_per_second']:>9.3f} {r['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()
