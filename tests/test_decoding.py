"""vqgen's decoding step (``prior.decoding``): the logits of the transformers forward, tokens of the uncached sampler.

Every comparison is old vs new in one process with a tolerance (or token equality where the margins of the tiny
seeded model are far above float rounding), so it holds on any x86 CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vqgen.prior.config import PriorModelConfig
from vqgen.prior.decoding import StaticDecoder, UnsupportedModelError
from vqgen.prior.model import Prior
from vqgen.prior.sampling import SamplingConfig, SamplingError, sample_tokens
from vqgen.prior.vocab import TokenVocab

TINY = dict(n_layer=2, n_head=2, n_embd=32)
VOCAB = TokenVocab((16, 16), (3, 3), num_classes=3, class_conditional=True, per_image_codebook=True)


def tiny_prior(arch: str, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    return Prior(PriorModelConfig(arch=arch, class_conditional=True, **TINY), VOCAB).eval()


def step_logits(decoder: StaticDecoder, ids: torch.Tensor, fixed: bool) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) of ``ids`` (B, T) fed one position at a time."""
    step = decoder.step_at if fixed else decoder.step
    return torch.stack([step(ids[:, t], t).clone() for t in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("fixed", [False, True], ids=["prefix", "fixed-shape"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.inference_mode()
def test_step_logits_match_the_full_forward(arch, fixed):
    prior = tiny_prior(arch)
    ids = torch.randint(0, VOCAB.vocab_size, (5, VOCAB.seq_len), generator=torch.Generator().manual_seed(1))
    full = prior.transformer(input_ids=ids).logits  # (B, T, V)
    decoder = StaticDecoder(prior.transformer, 5, VOCAB.seq_len)
    cache = [t.data_ptr() for t in (*decoder.keys, *decoder.values)]
    got = step_logits(decoder, ids, fixed)
    assert (got - full).abs().max() < 1e-5
    assert [t.data_ptr() for t in (*decoder.keys, *decoder.values)] == cache  # written in place, never reallocated
    # the weights are the model's own tensors (fp32, no autocast): no copy
    assert decoder.head.weight.data_ptr() == prior.transformer.lm_head.weight.data_ptr()


@torch.inference_mode()
def test_grouped_query_llama():
    """A Llama with fewer key/value heads than query heads (the prior builds none, a loaded one may have them)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=9,
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    full = model(input_ids=ids).logits
    for fixed in (False, True):
        assert (step_logits(StaticDecoder(model, 3, 9), ids, fixed) - full).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.inference_mode()
def test_bf16_autocast_matches_the_transformers_forward_under_autocast(arch):
    """Under autocast the step casts each matrix once; the logits are those of the model's own bf16 forward."""
    prior = tiny_prior(arch)
    ids = torch.randint(0, VOCAB.vocab_size, (4, VOCAB.seq_len), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = prior.transformer(input_ids=ids).logits.float()
        decoder = StaticDecoder(prior.transformer, 4, VOCAB.seq_len)
        assert decoder.keys[0].dtype == torch.bfloat16 and decoder.head.weight.dtype == torch.bfloat16
        for fixed in (False, True):
            # bf16 has 8 bits of mantissa: the tolerance is a few units in the last place of logits of size ~0.5
            assert (step_logits(decoder, ids, fixed).float() - full).abs().max() < 2e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_owned_decoder_gives_the_tokens_of_the_transformers_decoder(arch):
    """Greedy, sampled and guided: the same tokens as the transformers forward with its StaticCache (today's path)."""
    prior = tiny_prior(arch)
    for params in (dict(temperature=0.0), dict(temperature=1.0, seed=4),
                   dict(temperature=0.9, top_k=6, top_p=0.9, cfg_scale=2.5, seed=5)):
        cfg = SamplingConfig(num_samples=7, batch_size=4, **params)
        ours, labels = sample_tokens(prior, cfg)
        theirs, labels2 = sample_tokens(prior, SamplingConfig(**{**cfg.__dict__, "decoder": "transformers"}))
        assert torch.equal(ours, theirs) and torch.equal(labels, labels2)


def test_decoders_are_kept_per_batch_size_and_rebuilt_when_weights_move():
    prior = tiny_prior("gpt2")
    cfg = SamplingConfig(num_samples=4, batch_size=4, temperature=0.0)
    first, _ = sample_tokens(prior, cfg)
    (key, (_, decoder)), = prior.__dict__["_decoders"].items()
    assert key[0] == 4
    sample_tokens(prior, cfg)
    assert prior.__dict__["_decoders"][key][1] is decoder  # reused: no new cache
    assert not any("decoder" in k for k in prior.state_dict())
    prior.transformer.to(torch.float64).to(torch.float32)  # new tensors: the old decoder would read stale weights
    assert torch.equal(sample_tokens(prior, cfg)[0], first)
    assert prior.__dict__["_decoders"][key][1] is not decoder


def test_cuda_graph_off_cuda_runs_eagerly_and_option_errors():
    from vqgen.core.config import ConfigError, from_dict

    prior = tiny_prior("llama")
    cfg = SamplingConfig(num_samples=3, batch_size=3, seed=1)
    eager, _ = sample_tokens(prior, cfg)
    assert torch.equal(sample_tokens(prior, SamplingConfig(**{**cfg.__dict__, "cuda_graph": True}))[0], eager)
    with pytest.raises(ConfigError, match="cuda_graph needs decoder=vqgen"):
        from_dict(SamplingConfig, {"cuda_graph": True, "decoder": "transformers"})
    with pytest.raises(ConfigError, match="decoder must be one of"):
        from_dict(SamplingConfig, {"decoder": "hf"})


def test_unsupported_model_is_a_sampling_error():
    prior = tiny_prior("gpt2")
    prior.transformer.config.model_type = "mystery"
    with pytest.raises(SamplingError, match="decoder=transformers"):
        sample_tokens(prior, SamplingConfig(num_samples=2, batch_size=2))
    with pytest.raises(UnsupportedModelError):
        StaticDecoder(prior.transformer, 2, VOCAB.seq_len)


def test_compiled_owned_step_gives_the_same_tokens():
    prior = tiny_prior("gpt2")
    cfg = SamplingConfig(num_samples=4, batch_size=4, seed=2, cfg_scale=1.5)
    eager, _ = sample_tokens(prior, cfg)
    cfg.compile = True
    assert torch.equal(sample_tokens(prior, cfg)[0], eager)
    compiled = [decoder for key, (_, decoder) in prior.__dict__["_decoders"].items() if key[2]]
    assert len(compiled) == 1 and compiled[0].compiled  # the compiled step is what ran


def test_a_kept_decoder_follows_weights_trained_in_place_under_autocast():
    """Under autocast the step reads cast copies of the matrices: a decoder kept on the prior refreshes them, so
    sampling after an in-place update uses the new weights."""
    prior = tiny_prior("gpt2")
    cfg = SamplingConfig(num_samples=4, batch_size=4, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample_tokens(prior, cfg)
        with torch.no_grad():
            for p in prior.transformer.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # in place: same tensors, the decoder is kept
        after, _ = sample_tokens(prior, cfg)
        fresh, _ = sample_tokens(prior, SamplingConfig(**{**cfg.__dict__, "decoder": "transformers"}))
    assert len(prior.__dict__["_decoders"]) == 1
    assert torch.equal(after, fresh)
