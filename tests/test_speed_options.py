"""Speed options at tiny sizes on the CPU: each computes what the default computes (up to float rounding).

train.fused (fused AdamW), model.attn_implementation / model.sdpa_backend (prior), the prior's compiled forward
without graph breaks, model.activation_checkpointing (vqgan tokenizer: same loss and gradients, less memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqgen.core.config import ConfigError, from_dict, load_config
from vqgen.core.training import make_optimizer
from vqgen.prior.config import PriorModelConfig
from vqgen.prior.model import Prior, tokenizer_record
from vqgen.prior.vocab import TokenVocab
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import QuantizerConfig

REPO = Path(__file__).resolve().parents[1]
VOCAB = TokenVocab((32,), (3, 3), num_classes=4, class_conditional=True)


def tiny_prior(arch: str = "llama", seed: int = 0, **options) -> Prior:
    torch.manual_seed(seed)
    return Prior(PriorModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, class_conditional=True, **options), VOCAB)


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (6, 3, 3), generator=gen), torch.randint(0, 4, (6,), generator=gen)


# ------------------------------------------------------------------------------------------------ fused AdamW
def test_fused_adamw_gives_the_same_update_and_survives_a_checkpoint_of_the_other_kind():
    def train(fused: bool, steps: int, state: dict | None = None):
        prior = tiny_prior(seed=0).train()
        if state is not None:
            prior.load_state_dict(state["model"])
        optimizer = make_optimizer(prior, 1e-2, (0.9, 0.95), 0.05, fused=fused)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        for i in range(steps):
            codes, labels = batch(i)
            prior(codes, labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return prior, optimizer

    plain, plain_opt = train(False, 6)
    fused, fused_opt = train(True, 6)
    assert fused_opt.param_groups[0]["fused"] is True and not plain_opt.param_groups[0]["fused"]
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint written without the fused kernel, loaded into a fused optimizer (and back): the configured
    # kernel is kept and training goes on exactly as before
    half, half_opt = train(False, 3)
    state = {"model": {k: v.clone() for k, v in half.state_dict().items()}, "optimizer": half_opt.state_dict()}
    resumed, resumed_opt = train(True, 0, state)
    assert all(group["fused"] is True for group in resumed_opt.param_groups)
    back, back_opt = train(False, 0, {"model": state["model"], "optimizer": resumed_opt.state_dict()})
    assert not back_opt.param_groups[0]["fused"]


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_attention_implementations_and_backends_give_the_same_loss(arch):
    codes, labels = batch()
    losses = {}
    for options in ({}, {"attn_implementation": "eager"}, {"sdpa_backend": "math"}, {"sdpa_backend": "flash"}):
        prior = tiny_prior(arch, **options).eval()
        assert prior.transformer.config._attn_implementation == options.get("attn_implementation", "sdpa")
        losses[str(options)] = prior(codes, labels).loss.item()
    reference = losses["{}"]
    assert all(abs(value - reference) < 1e-5 for value in losses.values()), losses


def test_attention_options_are_checked_and_kept_by_a_saved_prior(tmp_path):
    with pytest.raises(ConfigError, match="needs attn_implementation=sdpa"):
        from_dict(PriorModelConfig, {"attn_implementation": "eager", "sdpa_backend": "math"})
    with pytest.raises(ConfigError, match="sdpa_backend"):
        from_dict(PriorModelConfig, {"sdpa_backend": "fastest"})
    tok = tmp_path / "tok"
    VQVAE(ModelConfig(image_size=8, hidden=8, res_hidden=4, num_res_layers=1, downsample=2,
                      quantizer=QuantizerConfig(kind="ema", codebook_size=32, dim=4))).save_pretrained(tok)
    prior = tiny_prior(attn_implementation="eager")
    prior.tokenizer = tokenizer_record(tok)
    prior.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert loaded.cfg.attn_implementation == "eager"
    assert loaded.transformer.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flops_per_token_is_the_palm_formula(arch):
    prior = tiny_prior(arch)
    flops, terms = prior.flops_per_token()
    embeddings = {"gpt2": ("transformer.wte.weight", "transformer.wpe.weight"), "llama": ("model.embed_tokens.weight",)}
    matmul = sum(p.numel() for name, p in prior.transformer.named_parameters() if name not in embeddings[arch])
    assert terms == {"N": matmul, "L": 2, "H": 2, "Q": 16, "T": VOCAB.seq_len - 1}
    assert flops == 6 * matmul + 12 * 2 * 2 * 16 * (VOCAB.seq_len - 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_training_forward_is_one_graph(arch):
    """No value check reads the device inside torch.compile: the whole forward is one graph (train.compile)."""
    import torch._dynamo

    prior = tiny_prior(arch).train()
    codes, labels = batch()
    explained = torch._dynamo.explain(prior)(codes, labels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ checkpointing
def vqgan(checkpointing: bool) -> VQVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vqgan", image_size=32, hidden=16, channel_mult=[1, 2, 2], downsample=4, num_res_layers=1,
                      quantizer=QuantizerConfig(kind="vq", codebook_size=64, dim=8),
                      activation_checkpointing=checkpointing)
    return VQVAE(cfg).train()


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    results = []
    for checkpointing in (False, True):
        model = vqgan(checkpointing)
        out = model(images)
        loss = torch.nn.functional.mse_loss(out.recon, images) + out.quant.loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="arch=vqgan only"):
        from_dict(ModelConfig, {"activation_checkpointing": True})


PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {benchmarks!r})
from peak_memory import peak_mb, pin_mmap_threshold
pin_mmap_threshold()
torch.set_num_threads(1)
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import QuantizerConfig
peaks = {{}}
for checkpointing in (False, True):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(arch="vqgan", image_size=64, hidden=32, channel_mult=[1, 1, 2], downsample=4,
                              num_res_layers=2, quantizer=QuantizerConfig(kind="vq", codebook_size=64, dim=8),
                              activation_checkpointing=checkpointing)).train()
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    def step():
        out = model(images)
        (torch.nn.functional.mse_loss(out.recon, images) + out.quant.loss).backward()
        model.zero_grad(set_to_none=False)
    step()
    peaks[str(checkpointing)] = min(peak_mb(step, "cpu") for _ in range(2))
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the CPU peak needs Linux's VmHWM")
def test_activation_checkpointing_lowers_the_peak_memory_of_a_training_step():
    """Measured as benchmarks/peak_memory.py does (resident high-water mark, glibc's mmap threshold pinned), in a
    process of its own: a 64-px vqgan step keeps about a third of its activations with checkpointing."""
    script = PEAK_SCRIPT.format(benchmarks=str(REPO / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["True"] < 0.75 * peaks["False"], peaks


# ------------------------------------------------------------------------------------------------ trainers
def test_speed_options_through_the_trainers(tmp_path):
    """train.fused + model.activation_checkpointing (tokenizer) and train.fused + model.sdpa_backend (prior): the
    losses of the default run, and a run begun without the options resumes with them."""
    from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer

    tiny_vqgan = REPO / "configs" / "tokenizer" / "tiny_vqgan.yaml"
    runs = {}
    for name, extra in {"default": [], "fast": ["train.fused=true", "model.activation_checkpointing=true"]}.items():
        cfg = load_config(TokenizerRunConfig, tiny_vqgan, [f"output_dir={tmp_path / name}", "train.steps=4",
                                                            "train.checkpoint_every=4", *extra])
        train_tokenizer(cfg)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # every logged loss term (reconstruction, perceptual, quantizer, GAN, adaptive weight) of every step
    last = runs["default"][-1]
    keys = [k for k in last if k.endswith(("loss", "weight")) and isinstance(last[k], float)]
    assert {"loss", "disc_loss", "adaptive_weight"} <= set(keys)
    default = [{k: row[k] for k in keys if k in row} for row in runs["default"] if "loss" in row]
    fast = [{k: row[k] for k in keys if k in row} for row in runs["fast"] if "loss" in row]
    assert len(default) == 4
    for a, b in zip(default, fast):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------------------------ search blocks
def test_accelerator_search_blocks_pick_the_same_codes():
    """The nearest-code search runs in 2-MiB blocks on a CPU and 128-MiB blocks elsewhere: blocks split the rows,
    so every row's argmin is over the same distances."""
    from vqgen.tokenizer import search

    assert search.default_chunk(torch.device("cpu")) == search.DEFAULT_CHUNK_ELEMENTS
    assert search.default_chunk(torch.device("cuda")) == search.ACCELERATOR_CHUNK_ELEMENTS
    assert search.ACCELERATOR_CHUNK_ELEMENTS > search.DEFAULT_CHUNK_ELEMENTS
    gen = torch.Generator().manual_seed(0)
    x, codes = torch.randn(600, 2, generator=gen), torch.randn(4096, 2, generator=gen)  # 128 rows per 2-MiB block
    small = search.nearest(x, codes)
    assert torch.equal(search.nearest(x, codes, search.ACCELERATOR_CHUNK_ELEMENTS), small)
    brute = torch.cdist(x.double(), codes.double()).argmin(dim=1)
    assert (small == brute).float().mean() > 0.99  # float32 ||e||^2 - 2 x.e vs float64 distances: ties aside
