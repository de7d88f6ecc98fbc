"""A prior's training step on a CPU: what GPT-2's activation costs, measured in one run.

The quickstart's prior (GPT-2, 4 layers, width 128, 4 heads; 64 tokens of a 256-code book plus the class token,
batch 64, AdamW), trained as ``pipelines.train_prior`` does, with the MLP activation as the only difference:

- ``gelu``: the exact (erf) GELU, what ``prior.model`` builds today (as nanoGPT);
- ``gelu_new``: ``transformers``' default for GPT-2, the tanh approximation spelled as elementwise ops
  (what vqgen used before);
- ``gelu_pytorch_tanh``: the same approximation as one PyTorch kernel.

Every variant starts from the same weights and sees the same batch; repeats are interleaved (every variant once per
round), so load swings hit every variant alike. The table gives the median step time, tokens/s, model GFLOP/s
(``Prior.flops_per_token``: ``6 N + 12 L H Q T`` per token, PaLM's and nanoGPT's formula; MFU where ``--peak-gflops``
gives the CPU's peak, which no file on the machine states) and the ratio to ``gelu_new`` measured in this run::

    python benchmarks/prior_step_speed.py --json benchmarks/results/prior_step_speed.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.activations import ACT2FN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqgen.prior.config import PriorModelConfig  # noqa: E402
from vqgen.prior.vocab import TokenVocab  # noqa: E402
from vqgen.core.io import save_json  # noqa: E402
from vqgen.core.trainer import task_step  # noqa: E402
from vqgen.pipelines.train_prior import PriorRunConfig, PriorTask, PriorTrainConfig  # noqa: E402

VARIANTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
BASELINE = "gelu_new"


def build(activation: str, vocab: TokenVocab, shape: dict, batch: int):
    """(one training step, parameter count) of the prior stage's own task (``PriorTask`` under the trainer: AdamW,
    clipping at 1.0) for a GPT-2 prior whose MLP uses ``activation``; the same initial weights for every variant."""
    cfg = PriorRunConfig(tokens="<in memory>", model=PriorModelConfig(arch="gpt2", class_conditional=True, **shape),
                         train=PriorTrainConfig(lr=1e-3, weight_decay=0.05, warmup_steps=0, lr_schedule="constant",
                                                batch_size=batch, steps=10**9))
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, vocab.num_codes, (batch, *vocab.grid), generator=gen)
    labels = torch.randint(0, vocab.num_classes, (batch,), generator=gen)
    step = task_step(PriorTask(cfg, vocab=vocab), cfg.train, {"codes": codes, "label": labels})
    prior = step.trainer.unwrap(step.trainer.main)
    prior.transformer.config.activation_function = activation
    for block in prior.transformer.transformer.h:  # the MLP looks its activation up once, when it is built
        block.mlp.act = ACT2FN[activation]

    def run() -> float:
        step()
        return float(step.trainer.last_values["loss"])

    return run, prior


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a 1-layer width-32 prior (CPU test)")
    parser.add_argument("--peak-gflops", type=float, help="the CPU's peak GFLOP/s, for MFU (default: not reported)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = {"n_layer": 1, "n_head": 2, "n_embd": 32} if args.tiny else {"n_layer": 4, "n_head": 4, "n_embd": 128}
    vocab = TokenVocab((256,), (8, 8), num_classes=10, class_conditional=True)
    built = {v: build(v, vocab, shape, args.batch_size) for v in VARIANTS}
    steps = {v: step for v, (step, _) in built.items()}
    first_loss = {v: steps[v]() for v in VARIANTS}  # warm-up step; also shows they start alike
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            times[v].append((time.perf_counter() - start) / args.steps * 1000)
    tokens = args.batch_size * vocab.seq_len
    flops, terms = built[BASELINE][1].flops_per_token()
    base = statistics.median(times[BASELINE])
    rows = []
    for v in VARIANTS:
        ms = statistics.median(times[v])
        gflops = flops * args.batch_size * (vocab.seq_len - 1) / ms / 1e6  # predicted tokens per second x FLOPs
        rows.append({"variant": v, "ms_per_step": ms, "tokens_per_second": tokens / ms * 1000,
                     "model_gflops_per_second": gflops,
                     "mfu": gflops / args.peak_gflops if args.peak_gflops else None,
                     "speedup_vs_gelu_new": base / ms, "first_loss": first_loss[v], "ms_all": times[v]})
        print(f"{v:<20} {ms:8.1f} ms/step {tokens / ms * 1000:9.0f} tokens/s {gflops:7.1f} GFLOP/s "
              f"{base / ms:5.2f}x vs {BASELINE}")
    result = {"device": "cpu", "processor": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "model": {"arch": "gpt2", **shape, "parameters": built[BASELINE][1].num_parameters},
              "flops_per_token": flops, "flops_terms": terms,
              "mfu_formula": "6 N + 12 L H Q T per predicted token (Prior.flops_per_token) x tokens/s / peak",
              "tokens_per_step": tokens, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    if args.json:
        save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
