"""GPU benchmark suite: what a user with one accelerator wants to know before a full-size run, in one JSON.

Rows (each: throughput as the median of ``--repeats`` timed calls after ``--warmup`` calls, and the peak memory
one call allocates beyond what was live before it, ``benchmarks/peak_memory.py``), in this order:

- ``prior <arch> ...`` sampling (``llama`` then ``gpt2``; LlamaGen-B-sized: 12 layers, width 768, 12 heads, ~138M
  parameters with the 16384-code vocabulary, 16 x 16 = 256 tokens): KV-cached sampling of ``--sample-batch`` images
  (temperature 1, top-k 100) with vqgen's decoding step captured as a CUDA graph (``sample.cuda_graph``), the same
  step uncaptured, transformers' own forward with its ``StaticCache`` (what ``decoder=transformers`` runs: the
  *before* row), and one forward pass over the full sequence at the same batch (``cached_batch_over_forward``
  compares each sampling row with it); then ``exactness`` (see below);
- ``prior llama ... training``: AdamW steps at ``--prior-batch`` sequences: eager with PyTorch's default
  (``foreach``) AdamW (what the trainer runs by default), eager with fused AdamW (``train.fused``; what this suite
  timed before), and the forward through ``torch.compile`` with fused AdamW (``train.compile`` + ``train.fused``);
  each row gives the model FLOP/s and MFU (``mfu_formula``); then ``loss_curves``: the trainer's default and the
  compiled fused variant trained from the same weights on the same batches for ``--curve-steps`` steps;
- ``tokenizer 256px (vq16)``: the VQ-16-like preset of ``configs/tokenizer/imagenet256_vqgan.yaml`` at
  ``--batch-256`` images: training steps with the MSE-only loss and with L2 + LPIPS (random VGG16 trunk: same cost)
  + PatchGAN with the adaptive weight (discriminator step included), each without and with
  ``model.activation_checkpointing``; encode / decode of ``--infer-256`` images;
- ``tokenizer 32px``: training steps of the papers' preset, EMA 512 x 128 and the adaptive W = 65536 ladder, and the
  adaptive one again with the nearest-code search in the CPU's 2-MiB blocks (``tokenizer.search``; how every device
  ran it before: the *before* row);
- extras (the most compilation time, last): sampling with the compiled and captured vqgen step and with the compiled
  transformers forward (*before*), training with each SDPA backend (``model.sdpa_backend``) and at 2 and 4 times the
  batch (tokens per step), the adaptive tokenizer step through ``torch.compile``.

``exactness`` (per sampling architecture, at ``--exact-batch`` sequences): greedy tokens of vqgen's (captured) step
against the uncached sampler (full prefix every step), and the largest difference between its logits (fed the
reference's greedy tokens one at a time) and one forward over the full sequences: in fp32 with TF32 off (the
reference), in bf16 autocast against the bf16 forward, and bf16 against the fp32 forward. ``min_top2_margin`` is
the smallest gap between the two largest logits of the reference, the scale below which a greedy choice can flip.

MFU (nanoGPT's, from PaLM appendix B): model FLOPs per token ``6 N + 12 L H Q T`` (``Prior.flops_per_token``; N:
parameters that take part in matrix products, i.e. all but the input token embedding and GPT-2's position table;
L layers, H heads, Q head size, T context) times tokens/s over the device's dense bf16 peak (H100 / H200 SXM
989.4 TFLOP/s; ``--peak-tflops``).

``--only GROUP[,GROUP]`` (``prior`` = ``sample`` + ``train``, ``tokenizer256``, ``tokenizer32``, ``extras``) runs a
subset; ``--budget-s S`` skips the rows that would start after S seconds, or after S - 120 for a row that compiles
(listed in ``skipped``), so one run fits a device lease; the JSON is rewritten after every row. A row that fails records its ``error`` and the suite goes on.

Everything runs under ``--precision`` autocast (bf16 by default, as ``accelerate launch --mixed_precision bf16``)::

    python benchmarks/gpu_suite.py --budget-s 420 --json benchmarks/results/gpu_suite_h100.json

``--tiny`` shrinks every size and leaves out the rows that compile, so the whole suite runs on a CPU in a minute
(the test does this); its numbers mean nothing beyond "the suite works".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's library

from peak_memory import peak_mb  # noqa: E402
from tokenizer_throughput import PRESETS, res256_operations, tokenizer_step, vq16_config  # noqa: E402

from vqgen.core.io import save_json  # noqa: E402
from vqgen.core.trainer import task_step  # noqa: E402
from vqgen.pipelines.train_prior import PriorRunConfig, PriorTask, PriorTrainConfig  # noqa: E402
from vqgen.prior.config import PriorModelConfig  # noqa: E402
from vqgen.prior.decoding import StaticDecoder  # noqa: E402
from vqgen.prior.model import Prior  # noqa: E402
from vqgen.prior.sampling import SamplingConfig, sample_tokens  # noqa: E402
from vqgen.prior.vocab import TokenVocab  # noqa: E402
from vqgen.tokenizer.model import ModelConfig  # noqa: E402

LLAMAGEN_B = {"n_layer": 12, "n_head": 12, "n_embd": 768}
TINY_PRIOR = {"n_layer": 2, "n_head": 2, "n_embd": 32}
GROUPS = ("sample", "train", "tokenizer256", "tokenizer32", "extras")
COMPILE_RESERVE_S = 120.0  # what a row that compiles may take (a 138M prior's training step: about a minute or two)
# dense bf16 tensor-core peaks (TFLOP/s), by a substring of the device name; the first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0),
                    ("L40S", 362.05), ("A10G", 70.0))
MFU_FORMULA = ("MFU = (6 N + 12 L H Q T) x tokens/s / peak; N = parameters in matrix products (all but the input "
               "token embedding and GPT-2's position table), L layers, H heads, Q head size, T context length "
               "(PaLM appendix B, as nanoGPT's estimate_mfu)")


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


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s (``override`` if given; None where unknown or not bf16)."""
    if override:
        return override
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class Suite:
    """Runs rows in order, keeps the budget, writes the JSON after every row."""

    def __init__(self, args, device: torch.device, autocast):
        self.args, self.device, self.autocast = args, device, autocast
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.records: dict[str, dict] = {}  # exactness, loss curves: per group
        self.skipped: list[str] = []
        self.deferred: list = []  # callables run with the extras (rows that compile again)
        self.peak = peak_tflops(device, args.precision, args.peak_tflops)
        self.result: dict = {}

    def over_budget(self, reserve: float = 0.0) -> bool:
        """Whether a row expected to take ``reserve`` seconds would end past ``--budget-s``."""
        return bool(self.args.budget_s) and time.perf_counter() - self.start + reserve > self.args.budget_s

    def save(self) -> None:
        self.result.update(rows=self.rows, records=self.records, skipped=self.skipped,
                           elapsed_seconds=time.perf_counter() - self.start)
        if self.args.json:
            save_json(self.result, self.args.json)  # atomic; makes the folder

    def row(self, group: str, operation: str, fn, items: int, unit: str = "images", warmup: int | None = None,
            repeats: int | None = None, extra=None, reserve: float = 0.0) -> dict | None:
        """Time ``fn`` (``items`` per call) as one row; ``extra(row)`` adds fields. None when skipped or failed.

        ``reserve``: seconds the row may take (a compilation), kept free of the budget before it starts."""
        if self.over_budget(reserve):
            self.skipped.append(f"{group}: {operation}")
            self.save()
            return None
        row = {"group": group, "operation": operation, "unit": unit}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row.update(measure(fn, items, self.device, self.args.warmup if warmup is None else warmup,
                                   self.args.repeats if repeats is None else repeats))
                if extra is not None:
                    row.update(extra(row))
            except Exception as err:  # noqa: BLE001 - one failing row must not cost the device run the others
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
                traceback.print_exc()
        found = sorted({str(w.message)[:300] for w in caught if issubclass(w.category, RuntimeWarning)})
        if found:
            row["warnings"] = found
        row["wall_seconds"] = time.perf_counter() - t0
        self.rows.append(row)
        if "error" in row:
            print(f"{group:<32} {operation:<58} failed: {row['error'][:120]}", flush=True)
        else:
            mfu = f" MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
            print(f"{group:<32} {operation:<58} {row['per_second']:>12.1f} {unit}/s {row['peak_mb']:>9.0f} MiB peak"
                  f"{mfu}", flush=True)
        self.save()
        return None if "error" in row else row

    def record(self, group: str, name: str, fn) -> None:
        """Store ``fn()`` (a dict) under ``records[group][name]`` (or its error), within the budget."""
        if self.over_budget():
            self.skipped.append(f"{group}: {name}")
            self.save()
            return
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            value = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        value["wall_seconds"] = time.perf_counter() - t0
        self.records.setdefault(group, {})[name] = value
        print(f"{group:<32} {name}: {value}", flush=True)
        self.save()


# ---------------------------------------------------------------------------------------------------- prior
def build_prior(arch: str, shape: dict, codebook: int, grid: int, device: torch.device) -> Prior:
    torch.manual_seed(0)
    return Prior(PriorModelConfig(arch=arch, **shape), TokenVocab((codebook,), (grid, grid))).to(device)


def sampler(prior: Prior, batch: int, **options):
    """One batch of ``batch`` images (temperature 1, top-k 100) with sampling ``options``."""
    cfg = SamplingConfig(num_samples=batch, batch_size=batch, temperature=1.0, top_k=100, **options)

    def fn():
        prior.eval()
        sample_tokens(prior, cfg)
    return fn


def decoder_state(prior: Prior) -> dict:
    """Whether the vqgen decoders kept on the prior were compiled / captured (what the last rows ran)."""
    decoders = [d for _, d in prior.__dict__.get("_decoders", {}).values()]
    return {"captured": any(d.captured for d in decoders), "compiled": any(d.compiled for d in decoders)}


def sampling_rows(suite: Suite, prior: Prior, group: str, batch: int, before: bool, exact_batch: int) -> None:
    """Item 2: sampling with vqgen's step (captured, eager), transformers' (before), the forward floor, exactness."""
    rows = []
    graph = suite.row(group, "sample, vqgen step + CUDA graph (sample.cuda_graph)",
                      sampler(prior, batch, cuda_graph=True), batch, extra=lambda r: decoder_state(prior))
    rows.append(graph)
    rows.append(suite.row(group, "sample, vqgen step (eager)", sampler(prior, batch), batch))
    if before:
        rows.append(suite.row(group, "sample, transformers StaticCache (before: decoder=transformers)",
                              sampler(prior, batch, decoder="transformers"), batch, warmup=1,
                              repeats=min(2, suite.args.repeats)))
    full = torch.randint(0, prior.vocab.num_codes, (batch, *prior.vocab.grid), device=suite.device)

    @torch.no_grad()
    def forward():
        prior.eval()
        prior(full)

    floor = suite.row(group, "forward, full sequence (no grad)", forward, batch)
    if floor is not None:
        for row in rows:
            if row is not None:
                row["cached_batch_over_forward"] = row["seconds_per_call"] / floor["seconds_per_call"]
    suite.record(group, "exactness", lambda: exactness(prior, exact_batch, suite.device))


def _greedy_and_logits(prior: Prior, batch: int, device: torch.device) -> dict:
    """Greedy tokens of vqgen's step (captured on CUDA) and of the uncached sampler; the step's logits over the
    uncached greedy sequences, and the full forward's over the same."""
    greedy = SamplingConfig(num_samples=batch, batch_size=batch, temperature=0.0, cuda_graph=True)
    ours, _ = sample_tokens(prior, greedy)
    reference, _ = sample_tokens(prior, dataclasses.replace(greedy, use_cache=False, cuda_graph=False))
    vocab = prior.vocab
    ids = vocab.encode(reference.to(device))  # (B, T)
    decoder = StaticDecoder(prior.transformer, batch, vocab.seq_len)
    if device.type == "cuda":
        decoder.capture()
    with torch.inference_mode():
        steps = torch.stack([decoder.step_at(ids[:, t], t).float().clone() for t in range(vocab.seq_len - 1)], 1)
        full = prior.transformer(input_ids=ids[:, :-1]).logits.float()  # (B, T-1, V)
    top2 = full.topk(2, dim=-1).values
    same = ours.to(reference.device) == reference
    return {"ours": ours, "reference": reference, "steps": steps, "full": full,
            "greedy_identical_to_uncached": bool(same.all()), "identical_token_share": float(same.float().mean()),
            "max_logit_diff_vs_full_forward": float((steps - full).abs().max()),
            "min_top2_margin": float((top2[..., 0] - top2[..., 1]).min())}


def exactness(prior: Prior, batch: int, device: torch.device) -> dict:
    """vqgen's step against the uncached path in fp32 (TF32 off) and bf16 (see the module docstring)."""
    prior.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            fp32 = _greedy_and_logits(prior, batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = _greedy_and_logits(prior, batch, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    keys = ("greedy_identical_to_uncached", "identical_token_share", "max_logit_diff_vs_full_forward",
            "min_top2_margin")
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        ids = prior.vocab.encode(bf16["reference"].to(device))
        fp32_full = prior.transformer(input_ids=ids[:, :-1]).logits.float()
    return {"batch": batch, "fp32": {k: fp32[k] for k in keys}, "bf16": {k: bf16[k] for k in keys},
            "bf16_step_vs_fp32_forward_max_logit_diff": float((bf16["steps"] - fp32_full).abs().max()),
            "reference": "fp32: TF32 off, autocast off; bf16: both paths under bf16 autocast"}


def structured_tokens(codebook: int, grid: int, pool: int, device: torch.device) -> torch.Tensor:
    """A pool (pool, grid, grid) of fixed random grids: a prior's loss falls fast as it memorises them."""
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, codebook, (pool, grid, grid), generator=gen).to(device)


def prior_step(shape: dict, codebook: int, grid: int, rows: int, pool: torch.Tensor, device: torch.device,
               fused: bool, compiled: bool, backend: str = "auto"):
    """The prior stage's own training step (``PriorTask`` under the trainer: AdamW (0.9, 0.95), weight decay 0.05,
    clipping at 1.0, ``train.fused`` / ``train.compile`` / ``model.sdpa_backend`` as given) on ``rows`` grids drawn
    from ``pool`` each step; the same initial weights for every variant (the trainer's seed)."""
    cfg = PriorRunConfig(tokens="<in memory>",
                         model=PriorModelConfig(arch="llama", sdpa_backend=backend, **shape),
                         train=PriorTrainConfig(lr=3e-4, weight_decay=0.05, warmup_steps=0, lr_schedule="constant",
                                                batch_size=rows, fused=fused, compile=compiled, steps=10**9))
    gen = torch.Generator(device=device).manual_seed(0)

    def batches():
        while True:
            yield {"codes": pool[torch.randint(0, pool.shape[0], (rows,), generator=gen, device=device)]}

    task = PriorTask(cfg, vocab=TokenVocab((codebook,), (grid, grid)))
    return task_step(task, cfg.train, batches())


def training_rows(suite: Suite, shape: dict, codebook: int, grid: int, batch: int, compile_rows: bool) -> None:
    """Item 1: the prior's training step before / fused / compiled, with MFU; the loss curves of both ends."""
    device = suite.device
    pool = structured_tokens(codebook, grid, 8 * batch, device)
    probe = build_prior("llama", shape, codebook, grid, device)
    flops, terms = probe.flops_per_token()
    group = f"prior llama {probe.num_parameters / 1e6:.0f}M, {grid * grid} tokens, training"
    suite.result["sizes"]["prior_train"] = {**shape, "arch": "llama", "parameters": probe.num_parameters,
                                            "flops_per_token": flops, "flops_terms": terms}
    del probe

    def mfu(row: dict) -> dict:
        model_flops = flops * row["per_second"]
        return {"flops_per_token": flops, "model_tflops_per_second": model_flops / 1e12,
                "mfu": model_flops / (suite.peak * 1e12) if suite.peak else None,
                "peak_tflops": suite.peak, "batch": row["items_per_call"] // (grid * grid)}

    def release() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def timed(name: str, fused: bool, use_compiled: bool, rows: int = batch, backend: str = "auto"):
        step = prior_step(shape, codebook, grid, rows, pool, device, fused, use_compiled, backend)
        suite.row(group, name, step, rows * grid * grid, unit="tokens", extra=mfu,
                  reserve=COMPILE_RESERVE_S if use_compiled else 0.0)
        del step
        release()

    timed("train step (eager, AdamW foreach: the trainer's default)", fused=False, use_compiled=False)
    timed("train step (eager, fused AdamW: train.fused; the suite's earlier row)", fused=True, use_compiled=False)
    if compile_rows:
        timed("train step (compiled, fused AdamW: train.compile + train.fused)", fused=True, use_compiled=True)

    def curves() -> dict:
        out = {}
        variants = {"before": (False, False)}  # the trainer's default
        if compile_rows:
            variants["compiled_fused"] = (True, True)
        else:
            variants["fused"] = (True, False)
        for name, (fused, use_compiled) in variants.items():
            step = prior_step(shape, codebook, grid, batch, pool, device, fused, use_compiled)
            losses = []
            for _ in range(suite.args.curve_steps):
                step()
                losses.append(float(step.trainer.last_values["loss"]))
            out[name] = losses
            del step
            release()
        a, b = out["before"], out[list(variants)[1]]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        half = a[len(a) // 2:]
        return {"losses": out, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                "final": {k: v[-1] for k, v in out.items()},
                "noise_scale_mean_abs_step_change_before": (sum(abs(x - y) for x, y in zip(half[1:], half[:-1]))
                                                            / max(1, len(half) - 1)),
                "batch": batch, "pool": pool.shape[0]}

    suite.record(group, "loss_curves", curves)
    suite.deferred.append(lambda: extra_training_rows(suite, timed, compile_rows, batch))


def extra_training_rows(suite: Suite, timed, can_compile: bool, batch: int) -> None:
    """The training variants that cost a compilation each (SDPA backends, twice the batch)."""
    if not can_compile:
        return
    for backend in ("flash", "cudnn", "efficient"):
        timed(f"train step (compiled, fused AdamW, model.sdpa_backend={backend})", fused=True, use_compiled=True,
              backend=backend)
    for factor in (2, 4):  # tokens per step (train.batch_size x grad_accum)
        timed(f"train step (compiled, fused AdamW, batch {factor * batch})", fused=True, use_compiled=True,
              rows=factor * batch)


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer32_ops(batch: int, device: torch.device, tiny: bool, compiled_adaptive: bool = False) -> dict:
    """The papers' preset: one training step per quantizer, the tokenizer stage's own (``TokenizerTask`` under the
    trainer, MSE-only; ``compiled_adaptive``: the adaptive one with ``train.compile``)."""
    ops = {}
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    presets = {f"{name}, compiled": q for name, q in PRESETS.items() if q.kind == "adaptive"} if compiled_adaptive \
        else PRESETS
    for name, qcfg in presets.items():
        if tiny:
            qcfg = type(qcfg)(**{**qcfg.__dict__, **({"capacity": 256} if qcfg.kind == "adaptive" else
                                                   {"codebook_size": 64})})
        model = ModelConfig(quantizer=qcfg, **({"hidden": 32, "res_hidden": 16} if tiny else {}))
        ops[f"train step, {name}"] = (tokenizer_step(model, images, fused=device.type == "cuda",
                                                     compiled=compiled_adaptive), batch)
    return ops


def with_cpu_search_blocks(fn):
    """``fn`` with the nearest-code search in the CPU's 2-MiB blocks on every device (how it ran before)."""
    from vqgen.tokenizer import search

    def run():
        saved = search.ACCELERATOR_CHUNK_ELEMENTS
        search.ACCELERATOR_CHUNK_ELEMENTS = search.DEFAULT_CHUNK_ELEMENTS
        try:
            fn()
        finally:
            search.ACCELERATOR_CHUNK_ELEMENTS = saved
    return run


def tokenizer256_rows(suite: Suite, res: int, tiny: bool) -> None:
    """Item 4: the VQ-16 steps without and with activation checkpointing; encode / decode."""
    args = suite.args
    vq16 = vq16_config(res)
    if tiny:
        vq16 = dataclasses.replace(vq16, hidden=16, channel_mult=[1, 1, 2], downsample=4, num_res_layers=1,
                                   quantizer=dataclasses.replace(vq16.quantizer, codebook_size=64))
    group = f"tokenizer {res}px (vq16)"
    plain = res256_operations(args.batch_256, args.infer_256, suite.device.type, res, vq16)
    for name in ("train step, MSE only", "train step, L2 + LPIPS + PatchGAN (adaptive weight)"):
        suite.row(group, name, *plain[name])
    ckpt = res256_operations(args.batch_256, args.infer_256, suite.device.type, res,
                             dataclasses.replace(vq16, activation_checkpointing=True))
    for name in ("train step, MSE only", "train step, L2 + LPIPS + PatchGAN (adaptive weight)"):
        suite.row(group, f"{name}, activation checkpointing", *ckpt[name])
    del ckpt
    for name in ("encode", "decode"):
        suite.row(group, name, *plain[name])


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here (after every row)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch-32", type=int, default=256)
    parser.add_argument("--batch-256", type=int, default=16)
    parser.add_argument("--infer-256", type=int, default=64)
    parser.add_argument("--prior-batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--exact-batch", type=int, default=8, help="sequences in the exactness check")
    parser.add_argument("--curve-steps", type=int, default=30, help="steps of each loss curve")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: known GPUs, bf16)")
    parser.add_argument("--budget-s", type=float, default=0, help="skip rows that would start after this (0: none)")
    parser.add_argument("--no-compile", action="store_true", help="leave out every row that compiles")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, no compiling: checks the suite runs (CPU)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups: {', '.join(GROUPS)} (prior = sample + train)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        args.batch_32, args.batch_256, args.infer_256, args.prior_batch, args.sample_batch = 4, 1, 2, 2, 2
        args.exact_batch, args.curve_steps = 2, 3
        args.warmup, args.repeats = 1, 1
        args.no_compile = True
        if device.type == "cpu":
            args.precision = "fp32"  # bf16 autocast on a CPU only makes the check slower
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    res, grid, codebook = (32, 2, 64) if args.tiny else (256, 16, 16384)
    shape = TINY_PRIOR if args.tiny else LLAMAGEN_B
    only = set()
    for name in (n.strip() for n in args.only.split(",") if n.strip()):
        only |= {"sample", "train"} if name == "prior" else {name}
    unknown = only - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from prior, {', '.join(GROUPS)}")

    suite = Suite(args, device, autocast)
    suite.result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None, "precision": args.precision,
        "tiny": args.tiny, "peak_tflops": suite.peak, "mfu_formula": MFU_FORMULA,
        "sizes": {"batch_32": args.batch_32, "batch_256": args.batch_256, "infer_256": args.infer_256,
                  "prior": {**shape, "codebook": codebook, "tokens": grid * grid}, "groups": sorted(only),
                  "prior_batch": args.prior_batch, "sample_batch": args.sample_batch, "exact_batch": args.exact_batch,
                  "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget_s},
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
    }
    compile_rows = not args.no_compile
    priors: dict[str, Prior] = {}
    with autocast:
        if "sample" in only:
            for arch in ("llama", "gpt2"):
                prior = priors[arch] = build_prior(arch, shape, codebook, grid, device).eval()
                suite.result["sizes"]["prior"][f"{arch}_parameters"] = prior.num_parameters
                group = f"prior {arch} {prior.num_parameters / 1e6:.0f}M, {grid * grid} tokens"
                sampling_rows(suite, prior, group, args.sample_batch, before=arch == "llama",
                              exact_batch=args.exact_batch)
        if "train" in only:
            training_rows(suite, shape, codebook, grid, args.prior_batch, compile_rows)
        if "tokenizer256" in only:
            tokenizer256_rows(suite, res, args.tiny)
        if "tokenizer32" in only:
            ops = tokenizer32_ops(args.batch_32, device, args.tiny)
            for name, (fn, items) in ops.items():
                suite.row("tokenizer 32px", name, fn, items)
            adaptive, items = next(op for name, op in ops.items() if "adaptive" in name)
            suite.row("tokenizer 32px", "train step, adaptive W=65536, 2-MiB search blocks (before)",
                      with_cpu_search_blocks(adaptive), items)
        if "extras" in only and compile_rows:
            for arch, prior in priors.items():
                group = f"prior {arch} {prior.num_parameters / 1e6:.0f}M, {grid * grid} tokens"
                suite.row(group, "sample, vqgen step compiled + CUDA graph (sample.compile + sample.cuda_graph)",
                          sampler(prior, args.sample_batch, compile=True, cuda_graph=True), args.sample_batch,
                          warmup=2, extra=lambda r, prior=prior: decoder_state(prior), reserve=COMPILE_RESERVE_S)
            if "llama" in priors:
                group = f"prior llama {priors['llama'].num_parameters / 1e6:.0f}M, {grid * grid} tokens"
                suite.row(group, "sample, transformers StaticCache compiled (before: decoder=transformers, compile)",
                          sampler(priors["llama"], args.sample_batch, decoder="transformers", compile=True),
                          args.sample_batch, warmup=2, repeats=min(3, args.repeats), reserve=COMPILE_RESERVE_S)
            for deferred in suite.deferred:
                deferred()
            for name, (fn, items) in tokenizer32_ops(args.batch_32, device, args.tiny, compiled_adaptive=True).items():
                suite.row("tokenizer 32px", name, fn, items, reserve=COMPILE_RESERVE_S)
    suite.save()
    return suite.result


if __name__ == "__main__":
    if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu" or not torch.cuda.is_available():
        from peak_memory import pin_mmap_threshold

        pin_mmap_threshold()  # on a CPU the peak follows live tensors only so (process-wide: a script's own process)
    main()
