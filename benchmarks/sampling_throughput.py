"""Sampling throughput of the prior: KV-cached vs full-prefix generation, and one full forward pass.

Draws ``--num-samples`` token grids (default 1,000 of 8x8) from a small randomly initialised GPT with
and without the KV cache and prints images/s for each, the speed-up, and the time of one teacher-forced
forward pass over a full batch (the floor any sampler is compared against: cached sampling does the
same work spread over ``seq_len`` steps)::

    python benchmarks/sampling_throughput.py --json bench_sampling.json

Both modes use the same per-sample randomness. Exactness is reported in a form that holds at any thread
count: ``greedy_identical`` (temperature 0, cached vs full-prefix tokens) and ``max_logit_diff`` (the largest
difference between the logits of the cached step-by-step path and one full-prefix forward over the same
sequences). ``identical_tokens`` (sampled at temperature 1) can be False where the two paths reduce in a
different order and a draw falls on a boundary of the inverse CDF. The cache is a static one (allocated once
per batch). ``--compile`` also times the compiled decoding step (``sample.compile``) after one compiling batch,
and says whether its greedy tokens equal the uncompiled ones.

For GPT-2, ``minimal_decoder`` times a reference that does only what cached decoding cannot avoid: per step and
layer the same weights' matrix products, a write of one key and value into a preallocated cache and attention over
the filled prefix only, no ``transformers`` forward and no attention masks (greedy, so its tokens are checked
against ours). It is the floor for ``cached_batch_over_forward`` on the machine at hand, not a sampler vqgen uses.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import StaticCache

from vqgen.prior.config import PriorModelConfig
from vqgen.prior.model import Prior
from vqgen.prior.sampling import SamplingConfig, sample_tokens
from vqgen.prior.vocab import TokenVocab
from vqgen.core.io import save_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(prior: Prior, cfg: SamplingConfig, device: torch.device) -> tuple[float, torch.Tensor, float]:
    """Seconds to draw ``cfg.num_samples`` grids (after a one-batch warm-up), the tokens, and the warm-up's seconds
    (with ``cfg.compile``: the compilation)."""
    warm = SamplingConfig(**{**cfg.__dict__, "num_samples": min(cfg.batch_size, cfg.num_samples)})
    t0 = time.perf_counter()
    sample_tokens(prior, warm)
    _sync(device)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes, _ = sample_tokens(prior, cfg)
    _sync(device)
    return time.perf_counter() - t0, codes, t_warm


@torch.inference_mode()
def time_forward(prior: Prior, batch: int, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one forward pass over ``batch`` full sequences."""
    ids = torch.randint(0, prior.vocab.num_codes, (batch, prior.vocab.seq_len), device=device)
    prior.transformer(input_ids=ids)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        prior.transformer(input_ids=ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def cached_vs_full_logits(prior: Prior, batch: int, device: torch.device) -> float:
    """Greedy-decode ``batch`` sequences step by step with the KV cache, then run the full sequences through one
    forward pass: the largest absolute difference between the two sets of next-token logits."""
    model, vocab = prior.transformer, prior.vocab
    ids = vocab.condition_tokens(None, batch, device)[:, None]
    cache = StaticCache(config=model.config, max_cache_len=vocab.seq_len)
    step_logits, step_input = [], ids
    for _ in range(1, vocab.seq_len):
        logits = model(input_ids=step_input, cache=cache, use_cache=True).logits[:, -1].float()
        step_logits.append(logits)
        step_input = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, step_input], dim=1)
    full = model(input_ids=ids[:, :-1], use_cache=False).logits.float()  # (B, T-1, V)
    return float((full - torch.stack(step_logits, dim=1)).abs().max())


@torch.inference_mode()
def minimal_greedy_decode(prior: Prior, batch: int, device: torch.device) -> torch.Tensor:
    """Greedy codes (batch, h, w) of a GPT-2 prior by the least work a KV-cached decoder does."""
    gpt, vocab = prior.transformer.transformer, prior.vocab
    heads, width = prior.cfg.n_head, prior.cfg.n_embd
    shape = (batch, heads, vocab.seq_len, width // heads)
    keys = [torch.empty(shape, device=device) for _ in gpt.h]
    values = [torch.empty(shape, device=device) for _ in gpt.h]
    seq = [vocab.condition_tokens(None, batch, device)]
    for pos in range(vocab.seq_len - 1):
        h = gpt.wte(seq[-1]) + gpt.wpe.weight[pos]
        for block, k_cache, v_cache in zip(gpt.h, keys, values):
            q, k, v = block.attn.c_attn(block.ln_1(h)).view(batch, 3, heads, -1).unbind(1)
            k_cache[:, :, pos], v_cache[:, :, pos] = k, v
            attn = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1])
            h = h + block.attn.c_proj(attn.reshape(batch, width))
            h = h + block.mlp(block.ln_2(h))
        logits = prior.transformer.lm_head(gpt.ln_f(h)).float()
        ids = torch.stack(seq, dim=1)
        seq.append(logits.masked_fill(~vocab.allowed(ids), float("-inf")).argmax(dim=-1))
    return vocab.decode(torch.stack(seq, dim=1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--grid", type=int, default=8, help="token grid side (grid x grid tokens per image)")
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decoding step (sample.compile)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = TokenVocab((args.codebook_size,), (args.grid, args.grid))
    prior = Prior(PriorModelConfig(arch=args.arch, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd),
                  vocab).to(device).eval()
    cfg = SamplingConfig(num_samples=args.num_samples, batch_size=args.batch_size, temperature=1.0, top_k=100)
    t_cached, cached, _ = time_sampling(prior, cfg, device)
    greedy = SamplingConfig(num_samples=args.batch_size, batch_size=args.batch_size, temperature=0.0)
    greedy_cached, _ = sample_tokens(prior, greedy)
    compiled = None
    if args.compile:
        cfg.compile = True
        t_compiled, _, t_compile = time_sampling(prior, cfg, device)
        cfg.compile = False
        greedy_compiled, _ = sample_tokens(prior, SamplingConfig(**{**greedy.__dict__, "compile": True}))
        compiled = {"seconds": t_compiled, "images_per_second": args.num_samples / t_compiled,
                    "first_batch_seconds": t_compile,
                    "greedy_identical_to_uncompiled": bool(torch.equal(greedy_compiled, greedy_cached))}
    cfg.use_cache = False
    t_full, full, _ = time_sampling(prior, cfg, device)
    t_forward = time_forward(prior, args.batch_size, device)
    greedy.use_cache = False
    greedy_full, _ = sample_tokens(prior, greedy)
    max_logit_diff = cached_vs_full_logits(prior, args.batch_size, device)
    batches = -(-args.num_samples // args.batch_size)
    minimal = None
    if args.arch == "gpt2":
        codes = minimal_greedy_decode(prior, args.batch_size, device)  # warm-up
        times = []
        for _ in range(batches):  # as many batches as the sampler drew; the median
            _sync(device)
            t0 = time.perf_counter()
            minimal_greedy_decode(prior, args.batch_size, device)
            _sync(device)
            times.append(time.perf_counter() - t0)
        t_minimal = sorted(times)[len(times) // 2]
        minimal = {"batch_seconds": t_minimal, "batch_over_forward": t_minimal / t_forward,
                   "greedy_identical_to_sampler": bool(torch.equal(codes.cpu(), greedy_cached))}
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "model": {"arch": args.arch, "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "parameters": prior.num_parameters},
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "tokens_per_image": args.grid * args.grid,
        "cached": {"seconds": t_cached, "images_per_second": args.num_samples / t_cached},
        "uncached": {"seconds": t_full, "images_per_second": args.num_samples / t_full},
        "speedup": t_full / t_cached,
        "forward_pass_seconds": t_forward,
        "cached_batch_over_forward": t_cached / batches / t_forward,
        **({"compiled": {**compiled, "cached_batch_over_forward": compiled["seconds"] / batches / t_forward}}
           if compiled else {}),
        **({"minimal_decoder": minimal} if minimal else {}),
        "identical_tokens": bool(torch.equal(cached, full)),
        "greedy_identical": bool(torch.equal(greedy_cached, greedy_full)),
        "max_logit_diff": max_logit_diff,
    }
    print(f"{args.num_samples} samples of {args.grid}x{args.grid} tokens, batch {args.batch_size}, "
          f"{prior.num_parameters / 1e6:.2f}M-parameter {args.arch} on {result['device']}")
    print(f"{'mode':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'KV cache':<28}{t_cached:>10.3f}{result['cached']['images_per_second']:>12.1f}")
    print(f"{'no cache (full prefix)':<28}{t_full:>10.3f}{result['uncached']['images_per_second']:>12.1f}")
    print(f"{'one forward, full batch':<28}{t_forward:>10.4f}")
    print(f"speed-up of the cache: {result['speedup']:.1f}x; one cached batch = "
          f"{result['cached_batch_over_forward']:.1f} full forward passes")
    if compiled:
        print(f"compiled decoding step: {compiled['images_per_second']:.1f} images/s, one batch = "
              f"{result['compiled']['cached_batch_over_forward']:.2f} forward passes (compiling took "
              f"{compiled['first_batch_seconds']:.0f} s; greedy tokens identical to uncompiled: "
              f"{compiled['greedy_identical_to_uncompiled']})")
    if minimal:
        print(f"minimal GPT-2 decoder (the floor): one batch = {minimal['batch_over_forward']:.2f} forward passes "
              f"(greedy tokens identical to the sampler's: {minimal['greedy_identical_to_sampler']})")
    print(f"exactness: greedy tokens identical {result['greedy_identical']}, max |logit difference| cached vs "
          f"full prefix {max_logit_diff:.2e}; sampled tokens identical {result['identical_tokens']}")
    if args.json:
        save_json(result, args.json)  # atomic; makes the folder
    return result


if __name__ == "__main__":
    main()
