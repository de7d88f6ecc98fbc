"""The training-step benchmark runs its eager variants on a tiny model (the speeds are not tested)."""

from __future__ import annotations

import json

import pytest


def test_train_step_variants_start_from_the_same_weights(benchmark_script, tmp_path):
    bench = benchmark_script("train_step_speed")
    out = tmp_path / "steps.json"
    result = bench.main(["--tiny", "--batch-size", "4", "--repeats", "2", "--steps", "1",
                         "--variants", "default,channels_last,fused_adamw", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["default", "channels_last", "fused_adamw"]
    assert rows["default"]["speedup_vs_default"] == 1.0
    # the same data and initial weights: the first losses agree up to float rounding
    assert rows["channels_last"]["first_loss"] == pytest.approx(rows["default"]["first_loss"], rel=1e-5)
    assert rows["fused_adamw"]["first_loss"] == pytest.approx(rows["default"]["first_loss"], rel=1e-6)
    assert all(len(r["ms_all"]) == 2 and min(r["ms_all"]) > 0 for r in rows.values())
    assert 0 < result["conv_share"] < 1
