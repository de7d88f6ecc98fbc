"""Prior library: vocabulary layout, KV-cached sampling, codebook masking, overfitting, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vqgen.prior.config import PriorModelConfig
from vqgen.prior.model import Prior
from vqgen.prior.sampling import SamplingConfig, SamplingError, filter_logits, sample_tokens
from vqgen.prior.vocab import TokenVocab, VocabError
from vqgen.tokenizer.layout import CodebookLayout

TINY = dict(n_layer=2, n_head=2, n_embd=32)


def tiny_prior(vocab: TokenVocab, arch: str = "gpt2", seed: int = 0, **kwargs) -> Prior:
    torch.manual_seed(seed)
    cfg = PriorModelConfig(arch=arch, class_conditional=vocab.class_conditional, **TINY, **kwargs)
    return Prior(cfg, vocab).eval()


# ---------------------------------------------------------------------------------------------- vocab
def test_vocab_layout_and_round_trip():
    v = TokenVocab((4, 8, 16), (2, 3), num_classes=5, class_conditional=True, per_image_codebook=True)
    assert (v.num_codes, v.bos, v.class_offset, v.null_class) == (28, 28, 29, 34)
    assert v.codebook_token_offset == 35 and v.vocab_size == 38 and v.seq_len == 2 + 6
    codes = torch.tensor([[[4, 5, 6], [7, 8, 11]], [[12, 27, 13], [14, 15, 16]]])  # codebooks 1 and 2
    ids = v.encode(codes, torch.tensor([3, -1]))
    assert ids[:, 0].tolist() == [29 + 3, 34]  # class 3, null class
    assert ids[:, 1].tolist() == [36, 37]  # codebook tokens
    assert torch.equal(v.decode(ids), codes)
    assert TokenVocab.from_dict(v.to_dict()) == v


def test_vocab_rejects_mixed_codebooks_and_bad_ids():
    v = TokenVocab((4, 8), (1, 2), per_image_codebook=True)
    with pytest.raises(VocabError, match="mixes codebooks"):
        v.encode(torch.tensor([[[0, 5]]]))
    with pytest.raises(VocabError, match="another tokenizer"):
        v.encode(torch.tensor([[[0, 12]]]))
    with pytest.raises(VocabError, match="grid"):
        v.encode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(VocabError, match="num_classes"):
        TokenVocab((4,), (1, 1), num_classes=0, class_conditional=True)


def test_vocab_from_layout_and_old_vocab_info():
    layout = CodebookLayout((4, 8), (2, 2), per_image_codebook=True, kind="adaptive")
    assert TokenVocab.from_layout(layout).per_image_codebook
    assert TokenVocab.from_layout(layout).codebook_offsets == [0, 4]
    plain = TokenVocab.from_layout(CodebookLayout((16,), (3, 3), kind="fsq"), num_classes=10)
    assert plain.vocab_size == 17 and plain.num_classes == 0  # unconditional ignores the classes
    # the vocab_info dict of token folders written before the layout existed
    info = {"kind": "adaptive", "codebook_size": 12, "codebook_sizes": [4, 8], "codebook_offsets": [0, 4],
            "granularity": "image", "grid": [2, 2]}
    assert CodebookLayout.from_dict(info) == CodebookLayout((4, 8), (2, 2), per_image_codebook=True, kind="adaptive")
    assert not CodebookLayout.from_dict({**info, "granularity": "position"}).per_image_codebook
    assert not CodebookLayout.from_dict({"kind": "ema", "codebook_size": 16, "codebook_sizes": [16],
                                         "granularity": None, "grid": [3, 3]}).per_image_codebook


def test_layout_maps_joint_ids_to_codebooks_once():
    layout = CodebookLayout((4, 8, 16), (1, 7))
    ids = torch.tensor([[0, 3, 4, 11, 12, 27, 27]])
    assert layout.codebook_offsets == (0, 4, 12) and layout.num_codes == 28
    assert layout.codebook_of(ids).tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    book, local = layout.local_ids(ids)
    assert local.tolist() == [[0, 3, 0, 7, 0, 15, 15]] and torch.equal(book, layout.codebook_of(ids))
    assert layout.selection_counts(ids).tolist() == [2, 2, 3]
    with pytest.raises(ValueError, match="several codebooks"):
        CodebookLayout((16,), (2, 2), per_image_codebook=True)


def test_allowed_masks():
    v = TokenVocab((4, 8), (1, 2), num_classes=2, class_conditional=True, per_image_codebook=True)
    prefix = torch.tensor([[v.class_offset], [v.null_class]])
    first = v.allowed(prefix)
    assert first.sum(1).tolist() == [2, 2] and first[:, v.codebook_token_offset:].all()
    prefix = torch.tensor([[v.class_offset, v.codebook_token_offset + 1], [v.null_class, v.codebook_token_offset]])
    codes = v.allowed(prefix)
    assert codes[0].nonzero().flatten().tolist() == list(range(4, 12))
    assert codes[1].nonzero().flatten().tolist() == list(range(0, 4))


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("decoder", ["vqgen", "transformers"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "params",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9, cfg_scale=2.0)],
    ids=["greedy", "sampled", "topk-topp-cfg"],
)
def test_kv_cache_matches_full_prefix(arch, params, decoder):
    v = TokenVocab((16, 16), (3, 3), num_classes=3, class_conditional=True, per_image_codebook=True)
    prior = tiny_prior(v, arch)
    cfg = SamplingConfig(num_samples=6, batch_size=4, seed=7, decoder=decoder, **params)
    cached, labels = sample_tokens(prior, cfg)
    cfg.use_cache = False
    uncached, labels2 = sample_tokens(prior, cfg)
    assert torch.equal(cached, uncached) and torch.equal(labels, labels2)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_a_transformer_that_ignores_the_cache_is_refused():
    """transformers < 5.24 takes ``cache=`` into **kwargs and drops it: each step would see one token (noise)."""
    prior = tiny_prior(TokenVocab((16,), (2, 2)))
    forward = prior.transformer.forward
    prior.transformer.forward = lambda *a, cache=None, **kw: forward(*a, **kw)  # what the old signature did
    with pytest.raises(SamplingError, match="ignored the KV cache"):  # a user error: one line, exit 2
        sample_tokens(prior, SamplingConfig(num_samples=2, batch_size=2, decoder="transformers"))
    assert sample_tokens(prior, SamplingConfig(num_samples=2, batch_size=2, use_cache=False))[0].shape == (2, 2, 2)


def test_samples_independent_of_batch_size_and_split():
    v = TokenVocab((32,), (2, 3))
    prior = tiny_prior(v)
    cfg = SamplingConfig(num_samples=7, batch_size=7, seed=3)
    whole, _ = sample_tokens(prior, cfg)
    cfg.batch_size = 2
    pieces = torch.cat([sample_tokens(prior, cfg, torch.arange(0, 3))[0], sample_tokens(prior, cfg, torch.arange(3, 7))[0]])
    assert torch.equal(whole, pieces)
    cfg.seed = 4
    assert not torch.equal(whole, sample_tokens(prior, cfg)[0])


def test_adaptive_image_samples_never_mix_codebooks():
    v = TokenVocab((2, 4, 8, 16), (3, 3), per_image_codebook=True)
    prior = tiny_prior(v, seed=1)
    codes, _ = sample_tokens(prior, SamplingConfig(num_samples=64, batch_size=32, temperature=1.5))
    books = v.codebook_of(codes.flatten(1))  # (N, 9)
    assert (books == books[:, :1]).all()
    assert len(books[:, 0].unique()) > 1  # the untrained prior picks several codebooks, each kept pure


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # softmax = .64, .24, .09, .03: nucleus 0.8 keeps the first two, a tiny nucleus keeps the argmax only
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=1e-3)).tolist() == [[False, True, True, True]]


def test_top_k_one_is_greedy():
    v = TokenVocab((32,), (2, 2))
    prior = tiny_prior(v)
    greedy, _ = sample_tokens(prior, SamplingConfig(num_samples=4, temperature=0.0))
    top1, _ = sample_tokens(prior, SamplingConfig(num_samples=4, temperature=1.0, top_k=1, seed=5))
    assert torch.equal(greedy, top1)


def test_sampling_option_errors():
    prior = tiny_prior(TokenVocab((8,), (2, 2)))
    with pytest.raises(SamplingError, match="class-conditional"):
        sample_tokens(prior, SamplingConfig(num_samples=2, cfg_scale=3.0))
    with pytest.raises(SamplingError, match="unconditional"):
        sample_tokens(prior, SamplingConfig(num_samples=2, labels=[1]))
    cond = tiny_prior(TokenVocab((8,), (2, 2), num_classes=2, class_conditional=True))
    with pytest.raises(SamplingError, match="not classes"):
        sample_tokens(cond, SamplingConfig(num_samples=2, labels=[5]))


# ---------------------------------------------------------------------------------------------- training
def test_overfits_tiny_token_set_and_samples_it_back():
    """One token grid per class: the NLL must go to ~0 and sampling each class must return its grid."""
    torch.manual_seed(0)
    v = TokenVocab((16,), (2, 3), num_classes=4, class_conditional=True)
    data = torch.randint(0, 16, (4, 2, 3))
    labels = torch.arange(4)
    prior = tiny_prior(v, label_dropout=0.0).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-2)
    for _ in range(150):
        loss = prior(data, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    with torch.no_grad():
        nll = prior(data, labels).loss.item()
    assert nll < 0.05, nll
    for params in (dict(temperature=0.0), dict(temperature=1.0, seed=11)):
        codes, got_labels = sample_tokens(prior, SamplingConfig(num_samples=8, batch_size=8, **params))
        assert torch.equal(codes, data[got_labels])


def test_label_dropout_only_in_training():
    v = TokenVocab((8,), (1, 2), num_classes=3, class_conditional=True)
    prior = tiny_prior(v, label_dropout=0.5)
    codes, labels = torch.zeros(200, 1, 2, dtype=torch.long), torch.zeros(200, dtype=torch.long)
    assert (prior.eval().sequences(codes, labels)[:, 0] == v.class_offset).all()
    first = prior.train().sequences(codes, labels)[:, 0]
    assert 40 < (first == v.null_class).sum() < 160


def test_forward_nll_matches_loss_and_shapes():
    v = TokenVocab((8,), (2, 2))
    prior = tiny_prior(v)
    out = prior(torch.randint(0, 8, (3, 2, 2)))
    assert out.logits.shape == (3, v.seq_len - 1, v.vocab_size) and out.nll.shape == (3,)
    assert math.isclose(out.loss.item(), out.nll.mean().item(), rel_tol=1e-6)


def test_model_config_errors():
    from vqgen.core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="divisible"):
        from_dict(PriorModelConfig, {"n_embd": 30, "n_head": 4})
    with pytest.raises(ConfigError, match="arch"):
        from_dict(PriorModelConfig, {"arch": "mamba"})


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "prior").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_prior_configs_load(path):
    from vqgen.pipelines.train_prior import PriorRunConfig
    from vqgen.core.config import load_config

    cfg = load_config(PriorRunConfig, path, ["tokens=somewhere"])
    assert cfg.model.n_embd % cfg.model.n_head == 0 and cfg.train.lr_schedule == "cosine"


def test_compiled_decoding_gives_the_same_tokens():
    """decoder=transformers: the model's own forward compiled (vqgen's compiled step: tests/test_decoding.py)."""
    prior = tiny_prior(TokenVocab((16,), (2, 2)))
    cfg = SamplingConfig(num_samples=4, batch_size=4, seed=2, decoder="transformers")
    eager, _ = sample_tokens(prior, cfg)
    cfg.compile = True
    assert torch.equal(sample_tokens(prior, cfg)[0], eager)
    assert "_compiled_decode" in prior.__dict__ and not any("_compiled" in k for k in prior.state_dict())


@pytest.mark.parametrize("decoder", ["vqgen", "transformers"])
def test_compile_failure_falls_back_to_eager(monkeypatch, decoder):
    def broken(*args, **kwargs):
        def fail(**kw):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    prior = tiny_prior(TokenVocab((16,), (2, 2)))
    cfg = SamplingConfig(num_samples=3, batch_size=3, seed=1, decoder=decoder)
    eager, _ = sample_tokens(prior, cfg)
    cfg.compile = True
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert torch.equal(sample_tokens(prior, cfg)[0], eager)
