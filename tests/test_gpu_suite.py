"""The GPU suite runs end to end at tiny sizes on the CPU and writes every row (the numbers are not tested)."""

from __future__ import annotations

import json


def test_gpu_suite_tiny_writes_every_row(benchmark_script, tmp_path):
    suite = benchmark_script("gpu_suite")
    out = tmp_path / "suite.json"
    result = suite.main(["--tiny", "--device", "cpu", "--peak-tflops", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not list(tmp_path.glob("*.tmp"))
    ops = [(r["group"].split()[0], r["operation"]) for r in result["rows"]]
    assert ops == [
        ("prior", "sample, vqgen step + CUDA graph (sample.cuda_graph)"), ("prior", "sample, vqgen step (eager)"),
        ("prior", "sample, transformers StaticCache (before: decoder=transformers)"),
        ("prior", "forward, full sequence (no grad)"),
        ("prior", "sample, vqgen step + CUDA graph (sample.cuda_graph)"), ("prior", "sample, vqgen step (eager)"),
        ("prior", "forward, full sequence (no grad)"),
        ("prior", "train step (eager, AdamW foreach: the trainer's default)"),
        ("prior", "train step (eager, fused AdamW: train.fused; the suite's earlier row)"),
        ("tokenizer", "train step, MSE only"), ("tokenizer", "train step, L2 + LPIPS + PatchGAN (adaptive weight)"),
        ("tokenizer", "train step, MSE only, activation checkpointing"),
        ("tokenizer", "train step, L2 + LPIPS + PatchGAN (adaptive weight), activation checkpointing"),
        ("tokenizer", "encode"), ("tokenizer", "decode"),
        ("tokenizer", "train step, ema 512x128"), ("tokenizer", "train step, adaptive W=65536"),
        ("tokenizer", "train step, adaptive W=65536, 2-MiB search blocks (before)")]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["per_second"] > 0 and row["peak_mb"] >= 0 and len(row["seconds_all"]) == 1
    assert not result["skipped"]
    # sampling in units of the forward pass; on a CPU the graph option runs the step eagerly
    sample, forward = result["rows"][0], result["rows"][3]
    assert sample["cached_batch_over_forward"] == sample["seconds_per_call"] / forward["seconds_per_call"]
    assert sample["captured"] is False
    # MFU: (6 N + 12 L H Q T) x tokens/s / peak, N without the input embedding
    train = result["rows"][7]
    terms = result["sizes"]["prior_train"]["flops_terms"]
    flops = 6 * terms["N"] + 12 * terms["L"] * terms["H"] * terms["Q"] * terms["T"]
    assert train["unit"] == "tokens" and train["items_per_call"] == 2 * 4  # batch 2, 2x2 grid
    assert train["flops_per_token"] == flops and terms["T"] == 4
    assert abs(train["mfu"] - flops * train["per_second"] / 1e12) < 1e-12
    # exactness and loss curves are records, per group
    for arch in ("llama", "gpt2"):
        exact = next(v["exactness"] for k, v in result["records"].items() if k.startswith(f"prior {arch}"))
        assert exact["fp32"]["greedy_identical_to_uncached"] is True
        assert exact["fp32"]["max_logit_diff_vs_full_forward"] < 1e-4
    curves = next(v["loss_curves"] for k, v in result["records"].items() if k.endswith("training"))
    assert len(curves["losses"]["before"]) == 3 and len(curves["losses"]["fused"]) == 3
    assert curves["max_abs_diff"] < 1e-3  # fused and foreach AdamW: the same update up to rounding


def test_gpu_suite_only_and_budget(benchmark_script):
    suite = benchmark_script("gpu_suite")
    result = suite.main(["--tiny", "--device", "cpu", "--only", "tokenizer32"])
    assert {r["group"].split()[0] for r in result["rows"]} == {"tokenizer"}
    assert result["sizes"]["groups"] == ["tokenizer32"]
    skipped = suite.main(["--tiny", "--device", "cpu", "--only", "tokenizer32", "--budget-s", "1e-9"])
    assert not skipped["rows"] and len(skipped["skipped"]) == 3
