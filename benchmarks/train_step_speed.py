"""Where a tokenizer training step's time goes on a CPU, and what each speed option buys, in one run.

The papers' preset (EMA 512 x 128, 32 px, width 128, batch 64), one optimizer update of the tokenizer stage's own
task (``TokenizerTask`` under ``vqgen.core.trainer``: AdamW, gradient clipping at 1.0, MSE-only loss), in variants
that share the data and the initial weights:

- ``default``: what the trainer runs today;
- ``channels_last``: model and images in channels-last memory format (oneDNN's preferred layout);
- ``fused_adamw``: ``train.fused: true`` (``torch.optim.AdamW(fused=True)``);
- ``compile``: the forward through ``torch.compile`` (inductor), as ``train.compile: true`` does; its
  compilation is timed separately and not counted in the step time.

Repeats are interleaved (every variant once per round), so load swings hit every variant alike; the table gives
the median step time and its ratio to ``default`` measured in this run, and the share of a default step spent in
convolutions (forward and backward) from the profiler::

    OMP_NUM_THREADS=1 python benchmarks/train_step_speed.py --threads 1 --json benchmarks/results/train_step_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.core.io import save_json  # noqa: E402
from vqgen.core.trainer import task_step  # noqa: E402
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, TokenizerTask, TokenizerTrainConfig  # noqa: E402
from vqgen.tokenizer.data import DataConfig  # noqa: E402
from vqgen.tokenizer.model import ModelConfig  # noqa: E402
from vqgen.tokenizer.quantizers import QuantizerConfig  # noqa: E402

VARIANTS = ("default", "channels_last", "fused_adamw", "compile")


def build(variant: str, images: torch.Tensor, tiny: bool):
    """The step function of one variant: the tokenizer stage's own step (``TokenizerTask`` under the trainer:
    AdamW, clipping at 1.0, MSE-only loss); the same initial weights for every variant."""
    shape = {"hidden": 16, "res_hidden": 8} if tiny else {}
    n = images.shape[0]
    cfg = TokenizerRunConfig(
        data=DataConfig(source="synthetic", image_size=32, channels=3, num_train=n, num_validation=n, num_test=n),
        model=ModelConfig(quantizer=QuantizerConfig(kind="ema", codebook_size=64 if tiny else 512, dim=128), **shape),
        train=TokenizerTrainConfig(lr=1e-4, batch_size=n, trackers=[], compile=variant == "compile",
                          fused=variant == "fused_adamw"),
    )
    step = task_step(TokenizerTask(cfg), cfg.train, {"image": images})
    if variant == "channels_last":
        step.trainer.unwrap(step.trainer.main).to(memory_format=torch.channels_last)
        step.batch["image"] = images.contiguous(memory_format=torch.channels_last)
    return step


def conv_share(step) -> float:
    """Share of one step's CPU time in convolution forward and backward kernels (profiler self time)."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return conv / total if total else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="rounds; each runs every variant --steps times")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (checks the script runs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, 32, 32) * 2 - 1
    variants = [v for v in args.variants.split(",") if v]
    steps, first, first_loss = {}, {}, {}
    for v in variants:
        steps[v] = build(v, images, args.tiny)
        t0 = time.perf_counter()
        steps[v]()  # warm-up; for compile, the compilation
        first_loss[v] = float(steps[v].trainer.last_values["loss"])
        first[v] = time.perf_counter() - t0
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            times[v].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times[variants[0]])
    rows = [{"variant": v, "ms_per_step": 1000 * statistics.median(times[v]),
             "speedup_vs_" + variants[0]: base / statistics.median(times[v]),
             "first_step_seconds": first[v], "first_loss": first_loss[v],
             "ms_all": [1000 * t for t in times[v]]} for v in variants]
    share = conv_share(steps[variants[0]])
    print(f"{'variant':<16}{'ms/step':>10}{'speed-up':>10}{'first step (s)':>16}")
    for r in rows:
        print(f"{r['variant']:<16}{r['ms_per_step']:>10.1f}{r['speedup_vs_' + variants[0]]:>10.2f}"
              f"{r['first_step_seconds']:>16.1f}")
    print(f"convolutions (forward + backward): {share:.0%} of a {variants[0]} step")
    result = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats, "steps": args.steps,
              "platform": platform.processor() or platform.machine(), "torch": torch.__version__,
              "load_average": os.getloadavg(), "conv_share": share, "rows": rows}
    if args.json:
        save_json(result, args.json)  # atomic; makes the folder
    return result


if __name__ == "__main__":
    main()
