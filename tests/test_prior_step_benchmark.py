"""The prior-step benchmark swaps only the activation: same weights, same batch (the speeds are not tested)."""

from __future__ import annotations

import json

import pytest


def test_prior_step_variants_differ_only_in_the_activation(benchmark_script, tmp_path):
    bench = benchmark_script("prior_step_speed")
    out = tmp_path / "prior_steps.json"
    result = bench.main(["--tiny", "--batch-size", "4", "--repeats", "2", "--steps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["gelu", "gelu_new", "gelu_pytorch_tanh"]
    assert rows["gelu_new"]["speedup_vs_gelu_new"] == 1.0
    # the two tanh forms are the same function; the exact GELU differs from them by < 1e-3 per activation
    assert rows["gelu_pytorch_tanh"]["first_loss"] == pytest.approx(rows["gelu_new"]["first_loss"], rel=1e-5)
    assert rows["gelu"]["first_loss"] == pytest.approx(rows["gelu_new"]["first_loss"], rel=1e-3)
    assert all(len(r["ms_all"]) == 2 and r["tokens_per_second"] > 0 for r in rows.values())
    assert result["tokens_per_step"] == 4 * 65
    # model FLOP/s by the formula of Prior.flops_per_token over the 64 predicted tokens per sequence; no MFU without
    # the CPU's peak
    gelu = rows["gelu"]
    expected = result["flops_per_token"] * 4 * 64 / gelu["ms_per_step"] / 1e6
    assert gelu["model_gflops_per_second"] == pytest.approx(expected) and gelu["mfu"] is None


def test_the_prior_builds_gpt2_with_the_exact_gelu():
    from transformers.activations import GELUActivation

    from vqgen.prior.config import PriorModelConfig
    from vqgen.prior.model import Prior
    from vqgen.prior.vocab import TokenVocab

    prior = Prior(PriorModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=32), TokenVocab((16,), (2, 2)))
    assert prior.transformer.config.activation_function == "gelu"
    assert isinstance(prior.transformer.transformer.h[0].mlp.act, GELUActivation)
