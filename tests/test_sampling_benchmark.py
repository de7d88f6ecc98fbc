"""The sampling benchmark's exactness and ratio fields, on a tiny prior (the speed numbers are not tested)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_benchmark_reports_exactness_and_ratios(benchmark_script, tmp_path, arch):
    bench = benchmark_script("sampling_throughput")
    out = tmp_path / "sampling.json"
    result = bench.main(["--batch-size", "3", "--rounds", "2", "--grid", "3", "--codebook-size", "16", "--arch", arch,
                         "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["greedy_identical"] is True
    assert result["identical_to_transformers"] == {"greedy": True, "sampled": True}
    assert 0 <= result["max_logit_diff"] < 1e-4
    assert result["speedup"] > 0 and result["cached_batch_over_forward"] > 0
    assert len(result["cached"]["seconds_all"]) == 2
    if arch == "gpt2":  # the minimal decoder (the benchmark's floor) does the same computation: the same greedy codes
        assert result["minimal_decoder"]["greedy_identical_to_sampler"] is True
        assert result["cached_over_minimal"] == (result["cached_greedy"]["batch_seconds"]
                                                 / result["minimal_decoder"]["batch_seconds"])
    else:
        assert "minimal_decoder" not in result
