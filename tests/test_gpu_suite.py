"""The GPU suite runs end to end at tiny sizes on the CPU and writes every row (the numbers are not tested)."""

from __future__ import annotations

import json


def test_gpu_suite_tiny_writes_every_row(benchmark_script, tmp_path):
    suite = benchmark_script("gpu_suite")
    out = tmp_path / "suite.json"
    result = suite.main(["--tiny", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not list(tmp_path.glob("*.tmp"))
    ops = [(r["group"].split()[0], r["operation"]) for r in result["rows"]]
    assert ops == [("tokenizer", "train step, ema 512x128"), ("tokenizer", "train step, adaptive W=65536"),
                   ("tokenizer", "train step, MSE only"),
                   ("tokenizer", "train step, L2 + LPIPS + PatchGAN (adaptive weight)"),
                   ("tokenizer", "encode"), ("tokenizer", "decode"), ("prior", "train step"),
                   ("prior", "sample (KV cache)"), ("prior", "forward, full sequence (no grad)")]
    for row in result["rows"]:
        assert row["per_second"] > 0 and row["peak_mb"] >= 0 and len(row["seconds_all"]) == 1
    prior_train = result["rows"][6]
    assert prior_train["unit"] == "tokens" and prior_train["items_per_call"] == 2 * 4  # batch 2, 2x2 grid
    assert result["sizes"]["prior"]["parameters"] > 0 and result["precision"] == "fp32"
    sample, forward = result["rows"][7], result["rows"][8]
    assert sample["cached_batch_over_forward"] == sample["seconds_per_call"] / forward["seconds_per_call"]


def test_gpu_suite_only_runs_the_named_groups(benchmark_script):
    suite = benchmark_script("gpu_suite")
    result = suite.main(["--tiny", "--device", "cpu", "--only", "prior"])
    assert {r["group"].split()[0] for r in result["rows"]} == {"prior"}
    assert result["sizes"]["groups"] == ["prior"]
