"""GPU benchmark suite: what a user with one accelerator wants to know before a full-size run, in one JSON.

Rows (each: throughput as the median of ``--repeats`` timed calls after ``--warmup`` calls, and the peak memory
one call allocates beyond what was live before it, ``benchmarks/peak_memory.py``):

- ``tokenizer 32px``: training steps (forward, quantizer update, backward, AdamW) of the papers' preset, EMA
  512 x 128 and the adaptive W = 65536 ladder, at ``--batch-32`` images;
- ``tokenizer 256px``: the VQ-16-like preset of ``configs/tokenizer/imagenet256_vqgan.yaml`` (16x down, VQ
  16384 x 8): a training step with the MSE-only loss and with L2 + LPIPS (random VGG16 trunk: same cost) +
  PatchGAN with the adaptive weight (discriminator step included), at ``--batch-256`` images; encode / decode;
- ``prior``: a LlamaGen-B-sized prior (llama, 12 layers, width 768, 12 heads, ~110M parameters with the
  16384-code vocabulary) on 16 x 16 = 256 tokens: training tokens/s (AdamW) at ``--prior-batch`` sequences,
  KV-cached sampling images/s (temperature 1, top-k 100) at ``--sample-batch``, eager and with the compiled
  decoding step (``sample.compile``; the first calls pay the compilation and are not timed), and one forward
  pass over the full sequence at the same batch (``cached batch / forward`` compares sampling with it).

``--only GROUP[,GROUP]`` (``tokenizer32``, ``tokenizer256``, ``prior``) runs a subset.

Everything runs under ``--precision`` autocast (bf16 by default, as ``accelerate launch --mixed_precision bf16``)::

    python benchmarks/gpu_suite.py --json benchmarks/results/gpu_suite_h100.json

``--tiny`` shrinks every size and leaves out the compiled sampling row, so the whole suite runs on a CPU in
seconds (the test does this); its numbers mean nothing beyond "the suite works".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's library

from peak_memory import peak_mb  # noqa: E402
from tokenizer_throughput import PRESETS, res256_operations, vq16_config  # noqa: E402

from vqgen.prior.config import PriorModelConfig  # noqa: E402
from vqgen.prior.model import Prior  # noqa: E402
from vqgen.prior.sampling import SamplingConfig, sample_tokens  # noqa: E402
from vqgen.prior.vocab import TokenVocab  # noqa: E402
from vqgen.core.io import save_json  # noqa: E402
from vqgen.tokenizer.model import ModelConfig, VQVAE  # noqa: E402

LLAMAGEN_B = {"arch": "llama", "n_layer": 12, "n_head": 12, "n_embd": 768}
TINY_PRIOR = {"arch": "llama", "n_layer": 2, "n_head": 2, "n_embd": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, items: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """Items/s (median over ``repeats`` timed calls after ``warmup``), seconds per call and peak MiB of one call."""
    for _ in range(warmup):
        fn()
    peak = peak_mb(fn, device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"items_per_call": items, "seconds_per_call": median, "per_second": items / median,
            "seconds_all": times, "peak_mb": peak}


def tokenizer32_ops(batch: int, device: torch.device, tiny: bool) -> dict:
    """The papers' 32-px preset: one training step per quantizer."""
    ops = {}
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    for name, qcfg in PRESETS.items():
        if tiny:
            qcfg = type(qcfg)(**{**qcfg.__dict__, **({"capacity": 256} if qcfg.kind == "adaptive" else
                                                   {"codebook_size": 64})})
        torch.manual_seed(0)
        model = VQVAE(ModelConfig(quantizer=qcfg, **({"hidden": 32, "res_hidden": 16} if tiny else {})))
        model = model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step(model=model, optimizer=optimizer):
            out = model(images)
            (F.mse_loss(out.recon.float(), images) + out.quant.loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ops[f"train step, {name}"] = (step, batch)
    return ops


def prior_ops(shape: dict, codebook: int, grid: int, train_batch: int, sample_batch: int,
              device: torch.device, compiled: bool = True) -> tuple[dict, int]:
    """A prior of ``shape``: one AdamW training step (tokens) and one cached sampling batch (images)."""
    torch.manual_seed(0)
    vocab = TokenVocab((codebook,), (grid, grid))
    prior = Prior(PriorModelConfig(**shape), vocab).to(device)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-4, weight_decay=0.05, fused=device.type == "cuda")
    codes = torch.randint(0, codebook, (train_batch, grid, grid), device=device)

    def train_step():
        prior.train()
        prior(codes).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sampling = SamplingConfig(num_samples=sample_batch, batch_size=sample_batch, temperature=1.0, top_k=100)
    full = torch.randint(0, codebook, (sample_batch, grid, grid), device=device)

    def sampler(compile_step: bool):
        cfg = dataclasses.replace(sampling, compile=compile_step)

        def fn():
            prior.eval()
            sample_tokens(prior, cfg)
        return fn

    @torch.no_grad()
    def forward():
        prior.eval()
        prior(full)

    ops = {"train step": (train_step, train_batch * grid * grid),  # tokens predicted (the class/BOS token is given)
           "sample (KV cache)": (sampler(False), sample_batch)}
    if compiled:  # left out by --tiny: compiling costs half a minute on a CPU, and tests/test_sampling checks it
        ops["sample (KV cache, compiled decoding step)"] = (sampler(True), sample_batch)
    ops["forward, full sequence (no grad)"] = (forward, sample_batch)
    return ops, prior.num_parameters


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch-32", type=int, default=256)
    parser.add_argument("--batch-256", type=int, default=16)
    parser.add_argument("--infer-256", type=int, default=64)
    parser.add_argument("--prior-batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the suite runs (CPU test)")
    parser.add_argument("--only", default="tokenizer32,tokenizer256,prior",
                        help="comma-separated groups to run: tokenizer32, tokenizer256, prior")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        args.batch_32, args.batch_256, args.infer_256, args.prior_batch, args.sample_batch = 4, 1, 2, 2, 2
        args.warmup, args.repeats = 1, 1
        if device.type == "cpu":
            args.precision = "fp32"  # bf16 autocast on a CPU only makes the check slower
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    res, grid, codebook = (32, 2, 64) if args.tiny else (256, 16, 16384)
    shape = TINY_PRIOR if args.tiny else LLAMAGEN_B

    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - {"tokenizer32", "tokenizer256", "prior"}
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from tokenizer32, tokenizer256, prior")
    groups: dict[str, dict] = {}
    params = None
    with autocast:
        if "tokenizer32" in only:
            groups["tokenizer 32px"] = tokenizer32_ops(args.batch_32, device, args.tiny)
        if "tokenizer256" in only:
            vq16 = vq16_config(res)
            if args.tiny:
                vq16 = dataclasses.replace(vq16, hidden=16, channel_mult=[1, 1, 2], downsample=4, num_res_layers=1,
                                           quantizer=dataclasses.replace(vq16.quantizer, codebook_size=64))
            groups[f"tokenizer {res}px (vq16)"] = res256_operations(args.batch_256, args.infer_256, device.type,
                                                                    res, vq16)
        if "prior" in only:
            prior, params = prior_ops(shape, codebook, grid, args.prior_batch, args.sample_batch, device,
                                      compiled=not args.tiny)
            groups[f"prior {params / 1e6:.0f}M, {grid * grid} tokens"] = prior
        rows = []
        for group, ops in groups.items():
            for name, (fn, items) in ops.items():
                row = {"group": group, "operation": name, **measure(fn, items, device, args.warmup, args.repeats)}
                row["unit"] = "tokens" if name == "train step" and group.startswith("prior") else "images"
                rows.append(row)
                if name == "forward, full sequence (no grad)":  # sampling in units of this forward pass
                    for other in rows:
                        if other["group"] == group and other["operation"].startswith("sample"):
                            other["cached_batch_over_forward"] = other["seconds_per_call"] / row["seconds_per_call"]
                print(f"{group:<28} {name:<54} {row['per_second']:>12.1f} {row['unit']}/s "
                      f"{row['peak_mb']:>9.0f} MiB peak", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "precision": args.precision,
        "tiny": args.tiny,
        "sizes": {"batch_32": args.batch_32, "batch_256": args.batch_256, "infer_256": args.infer_256,
                  "prior": {**shape, "parameters": params, "codebook": codebook, "tokens": grid * grid},
                  "groups": sorted(only),
                  "prior_batch": args.prior_batch, "sample_batch": args.sample_batch,
                  "warmup": args.warmup, "repeats": args.repeats},
        "rows": rows,
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        save_json(result, args.json)  # atomic; makes the folder
    return result


if __name__ == "__main__":
    main()
