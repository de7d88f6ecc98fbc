"""The sampling benchmark's exactness fields, on a tiny prior (the speed numbers are not tested)."""

from __future__ import annotations

import json


def test_sampling_benchmark_reports_greedy_identity_and_logit_difference(benchmark_script, tmp_path):
    bench = benchmark_script("sampling_throughput")
    out = tmp_path / "sampling.json"
    result = bench.main(["--num-samples", "6", "--batch-size", "3", "--grid", "3", "--codebook-size", "16",
                         "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["greedy_identical"] is True
    assert 0 <= result["max_logit_diff"] < 1e-3
    assert result["speedup"] > 0 and result["cached_batch_over_forward"] > 0
    # the minimal decoder (the benchmark's floor) does the same computation: the same greedy codes
    assert result["minimal_decoder"]["greedy_identical_to_sampler"] is True
    assert result["minimal_decoder"]["batch_over_forward"] > 0
