"""Tokenizer training throughput (images/s) of the papers' preset: 32x32 RGB, batch 64.

Times full optimizer steps (forward, quantizer update, backward, Adam) of ``ema`` (N = 512, D = 128) and
``adaptive`` (the W = 65536 ladder of 8 codebooks) in one run, interleaved, median over repeats, and
reports the ratio adaptive/fixed. Measured on whatever device is available (CPU here)::

    python benchmarks/tokenizer_throughput.py --threads 2 --steps 10 --repeats 5 --json bench_tok.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tokenizer.model import ModelConfig, VQVAE
from tokenizer.quantizers import QuantizerConfig

PRESETS = {
    "ema 512x128": QuantizerConfig(kind="ema", codebook_size=512, dim=128),
    "adaptive W=65536": QuantizerConfig(kind="adaptive", dim=128, capacity=65536),
}


def time_steps(model: VQVAE, optimizer, images: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` training steps on ``images``."""
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(images)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1
    setups = {}
    for name, qcfg in PRESETS.items():
        model = VQVAE(ModelConfig(quantizer=qcfg)).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        time_steps(model, optimizer, images, 2)  # warm-up
        setups[name] = (model, optimizer)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, (model, optimizer) in setups.items():
            times[name].append(time_steps(model, optimizer, images, args.steps))
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
    if args.json:
        meta = {"device": device, "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
                "repeats": args.repeats, "platform": platform.processor() or platform.machine(),
                "torch": torch.__version__, "ratio_adaptive_over_fixed": ratio}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
