"""Sampling throughput of the prior: vqgen's KV-cached decoding step against a minimal decoder, a full forward pass,
transformers' cached forward and full-prefix generation.

A small randomly initialised GPT (default GPT-2, 4 x 128, 8x8 tokens of a 512-code book, batch 250). Timed per batch,
interleaved (every variant once per round, ``--rounds`` rounds; medians), so load swings hit every variant alike:

- ``cached``: ``sample_tokens`` as the sampler runs by default (vqgen's step, ``prior.decoding``), temperature 1,
  top-k 100; ``cached_greedy`` the same at temperature 0;
- ``cached_transformers``: ``decoder=transformers`` (the model's own forward with its ``StaticCache``), temperature 1,
  top-k 100;
- ``minimal_decoder`` (GPT-2 only): a reference that does only what cached decoding cannot avoid: per step and layer
  the same weights' matrix products, a write of one key and value into a preallocated cache and attention over the
  filled prefix only, no ``transformers`` forward and no attention masks; greedy, so its tokens are checked against
  the sampler's. It is the floor for the sampler on the machine at hand, not a sampler vqgen uses;
- ``forward_pass_seconds``: one teacher-forced forward over a full batch (cached sampling does the same arithmetic
  spread over ``seq_len`` steps).

``cached_over_minimal`` = ``cached_greedy`` / ``minimal_decoder`` (the same work: greedy decoding of the same batch);
``cached_sampled_over_minimal`` = ``cached`` / ``minimal_decoder`` (plus top-k and inverse-CDF sampling, which the
minimal decoder does not do). ``uncached`` (the full prefix every step) is timed on one batch, after the rounds::

    python benchmarks/sampling_throughput.py --json benchmarks/results/sampling_throughput.json

Exactness, in a form that holds at any thread count: ``greedy_identical`` (temperature 0, cached vs full-prefix
tokens), ``max_logit_diff`` (the largest difference between the logits of vqgen's step, fed one token at a time, and
one full-prefix forward over the same sequences), ``identical_to_transformers`` (greedy and sampled tokens of the two
cached decoders). ``identical_tokens`` (sampled at temperature 1, cached vs uncached) can be False where the paths
reduce in a different order and a draw falls on a boundary of the inverse CDF (``identical_samples_share`` says how
many samples are the same). ``--compile`` adds the compiled decoding step (``sample.compile``; its first batch pays
the compilation and is not timed) to the interleaved variants, and says whether its greedy tokens equal the
uncompiled ones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vqgen.core.io import save_json
from vqgen.prior.config import PriorModelConfig
from vqgen.prior.decoding import StaticDecoder
from vqgen.prior.model import Prior
from vqgen.prior.sampling import SamplingConfig, sample_tokens
from vqgen.prior.vocab import TokenVocab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def step_vs_full_logits(prior: Prior, codes: torch.Tensor) -> float:
    """The largest absolute difference between vqgen's step logits (the sequences of ``codes`` fed one token at a
    time) and one full-prefix forward over the same sequences."""
    vocab = prior.vocab
    ids = vocab.encode(codes.to(next(prior.parameters()).device))  # (B, T)
    decoder = StaticDecoder(prior.transformer, ids.shape[0], vocab.seq_len)
    steps = torch.stack([decoder.step(ids[:, t], t).float() for t in range(vocab.seq_len - 1)], dim=1)
    full = prior.transformer(input_ids=ids[:, :-1]).logits.float()  # (B, T-1, V)
    return float((full - steps).abs().max())


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
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one batch of each variant)")
    parser.add_argument("--grid", type=int, default=8, help="token grid side (grid x grid tokens per image)")
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decoding step (sample.compile)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = TokenVocab((args.codebook_size,), (args.grid, args.grid))
    prior = Prior(PriorModelConfig(arch=args.arch, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd),
                  vocab).to(device).eval()
    batch = args.batch_size
    sampled = SamplingConfig(num_samples=batch, batch_size=batch, temperature=1.0, top_k=100)
    greedy = SamplingConfig(num_samples=batch, batch_size=batch, temperature=0.0)
    transformers_cfg = SamplingConfig(**{**sampled.__dict__, "decoder": "transformers"})
    full_ids = torch.randint(0, vocab.num_codes, (batch, vocab.seq_len), device=device)

    @torch.inference_mode()
    def forward():
        prior.transformer(input_ids=full_ids)

    variants = {
        "cached": lambda: sample_tokens(prior, sampled),
        "cached_greedy": lambda: sample_tokens(prior, greedy),
        "cached_transformers": lambda: sample_tokens(prior, transformers_cfg),
        "forward": forward,
    }
    if args.arch == "gpt2":
        variants["minimal_decoder"] = lambda: minimal_greedy_decode(prior, batch, device)
    if args.compile:
        compiled_cfg = SamplingConfig(**{**sampled.__dict__, "compile": True})
        variants["compiled"] = lambda: sample_tokens(prior, compiled_cfg)
    first_seconds = {}
    outputs = {}
    for name, fn in variants.items():  # warm-up (and compilation); the tokens for the checks below
        t0 = time.perf_counter()
        outputs[name] = fn()
        first_seconds[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}

    t_uncached = timed(lambda: outputs.__setitem__("uncached", sample_tokens(
        prior, SamplingConfig(**{**sampled.__dict__, "use_cache": False}))), device)
    greedy_uncached, _ = sample_tokens(prior, SamplingConfig(**{**greedy.__dict__, "use_cache": False}))
    greedy_transformers, _ = sample_tokens(prior, SamplingConfig(**{**greedy.__dict__, "decoder": "transformers"}))
    cached, greedy_cached = outputs["cached"][0], outputs["cached_greedy"][0]
    compiled = None
    if args.compile:
        greedy_compiled, _ = sample_tokens(prior, SamplingConfig(**{**greedy.__dict__, "compile": True}))
        compiled = {"batch_seconds": median["compiled"], "images_per_second": batch / median["compiled"],
                    "seconds_all": times["compiled"], "first_batch_seconds": first_seconds["compiled"],
                    "cached_batch_over_forward": median["compiled"] / median["forward"],
                    "greedy_identical_to_uncompiled": bool(torch.equal(greedy_compiled, greedy_cached))}

    def rate(name: str) -> dict:
        return {"batch_seconds": median[name], "images_per_second": batch / median[name], "seconds_all": times[name]}

    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "model": {"arch": args.arch, "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "parameters": prior.num_parameters},
        "batch_size": batch,
        "rounds": args.rounds,
        "tokens_per_image": args.grid * args.grid,
        "cached": rate("cached"),
        "cached_greedy": rate("cached_greedy"),
        "cached_transformers": rate("cached_transformers"),
        "uncached": {"batch_seconds": t_uncached, "images_per_second": batch / t_uncached},
        "speedup": t_uncached / median["cached"],
        "vqgen_over_transformers_speedup": median["cached_transformers"] / median["cached"],
        "forward_pass_seconds": median["forward"],
        "forward_seconds_all": times["forward"],
        "cached_batch_over_forward": median["cached"] / median["forward"],
        "cached_transformers_batch_over_forward": median["cached_transformers"] / median["forward"],
        **({"compiled": compiled} if compiled else {}),
        "identical_tokens": bool(torch.equal(cached, outputs["uncached"][0])),
        "identical_samples_share": float((cached == outputs["uncached"][0]).flatten(1).all(1).float().mean()),
        "greedy_identical": bool(torch.equal(greedy_cached, greedy_uncached)),
        "identical_to_transformers": {
            "greedy": bool(torch.equal(greedy_cached, greedy_transformers)),
            "sampled": bool(torch.equal(cached, outputs["cached_transformers"][0]))},
        "max_logit_diff": step_vs_full_logits(prior, greedy_cached),
    }
    if "minimal_decoder" in variants:
        result["minimal_decoder"] = {
            **rate("minimal_decoder"), "batch_over_forward": median["minimal_decoder"] / median["forward"],
            "greedy_identical_to_sampler": bool(torch.equal(outputs["minimal_decoder"].cpu(), greedy_cached))}
        result["cached_over_minimal"] = median["cached_greedy"] / median["minimal_decoder"]
        result["cached_sampled_over_minimal"] = median["cached"] / median["minimal_decoder"]

    print(f"batches of {batch} images of {args.grid}x{args.grid} tokens, {prior.num_parameters / 1e6:.2f}M-parameter "
          f"{args.arch} on {result['device']} ({result['processor']}, {result['torch_threads']} threads), "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'variant':<44}{'s / batch':>10}{'images/s':>10}{'x forward':>10}")
    for name in variants:
        if name != "forward":
            over = median[name] / median["forward"]
            print(f"{name:<44}{median[name]:>10.3f}{batch / median[name]:>10.1f}{over:>10.2f}")
    print(f"{'uncached (full prefix, one batch)':<44}{t_uncached:>10.3f}{batch / t_uncached:>10.1f}")
    print(f"{'one forward, full batch':<44}{median['forward']:>10.4f}")
    if "minimal_decoder" in variants:
        print(f"cached greedy / minimal decoder: {result['cached_over_minimal']:.2f}; sampled (top-k 100) / minimal: "
              f"{result['cached_sampled_over_minimal']:.2f}; minimal greedy tokens identical to the sampler's: "
              f"{result['minimal_decoder']['greedy_identical_to_sampler']}")
    print(f"vqgen step vs transformers StaticCache: {result['vqgen_over_transformers_speedup']:.2f}x, tokens identical "
          f"{result['identical_to_transformers']}")
    if compiled:
        print(f"compiled decoding step: {compiled['images_per_second']:.1f} images/s, one batch = "
              f"{compiled['cached_batch_over_forward']:.2f} forward passes (first batch "
              f"{compiled['first_batch_seconds']:.0f} s; greedy tokens identical to uncompiled: "
              f"{compiled['greedy_identical_to_uncompiled']})")
    print(f"exactness: greedy tokens identical {result['greedy_identical']}, max |logit difference| step vs full "
          f"prefix {result['max_logit_diff']:.2e}; sampled tokens identical {result['identical_tokens']} "
          f"({result['identical_samples_share']:.1%} of the samples)")
    if args.json:
        save_json(result, args.json)  # atomic; makes the folder
    return result


if __name__ == "__main__":
    main()
