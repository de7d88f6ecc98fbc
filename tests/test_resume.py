"""Exact resume in every mode: kill -9 with dead-code resets on, a damaged newest checkpoint, temperature schedules
that count optimizer steps."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqgen.core.trainer import MetricsLogger
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from vqgen.core.config import load_config
from vqgen.core.errors import CorruptFileError
from vqgen.tokenizer.quantizers import QuantizerConfig, build_quantizer
from vqgen.tokenizer.quantizers.gumbel import exponential_tau

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"
DEAD_CODES = ["model.quantizer.codebook_size=32", "model.quantizer.dead_code_threshold=4.0",
              "model.quantizer.dead_code_window=3"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing


def test_kill_9_and_rerun_is_bit_identical_with_dead_code_resets(kill_and_resume):
    """A user's kill -9 in the middle of training, then the same command: the same weights, bit for bit."""
    command = [sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY), "train.steps=24",
               "train.checkpoint_every=2", "train.log_every=4", "train.deterministic=true", *DEAD_CODES]
    full_run, part_run = kill_and_resume(command, kill_at="step_00000008")
    full = weights(full_run)
    window_count, resets = full["quantizer.dead_code_state"].tolist()
    assert resets >= 2  # codes really were re-seeded, before and after the kill
    assert_identical(full, weights(part_run))
    steps = [json.loads(line)["step"] for line in (part_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]


def tiny(out: Path, *overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, TINY, [f"output_dir={out}", "train.steps=6", "train.checkpoint_every=2",
                                                  "train.deterministic=true", *DEAD_CODES, *overrides])


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # the same length, bytes changed in the middle
        middle = len(data) // 2
        data[middle : middle + 16] = bytes(16)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, how", [
    ("model_tokenizer.safetensors", "truncate"),
    ("model_tokenizer.safetensors", "overwrite"),  # same size, bytes inside the tensor data changed: the sha256 tells
    ("optimizer_tokenizer.pt", "truncate"), ("optimizer_tokenizer.pt", "overwrite"),
    ("scheduler_tokenizer.pt", "overwrite"), ("rng_0.pt", "overwrite"), ("trainer.json", "overwrite"),
    ("vqgen_state.json", "truncate")])
def test_damaged_newest_checkpoint_falls_back_and_ends_identical(tmp_path, capsys, name, how):
    train_tokenizer(tiny(tmp_path / "full"))
    assert train_tokenizer(tiny(tmp_path / "part"), stop_after=4)["stopped_early"]  # checkpoints 2 and 4
    bad = tmp_path / "part" / "checkpoints" / "step_00000004" / name
    damage(bad, how)
    capsys.readouterr()
    train_tokenizer(tiny(tmp_path / "part"))
    err = capsys.readouterr().err
    assert f"checkpoint {bad.parent} is unusable" in err and name in err
    assert "resuming from the older checkpoint" in err and "step_00000002" in err
    assert_identical(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    assert train_tokenizer(tiny(tmp_path), stop_after=4)["stopped_early"]
    for checkpoint in (tmp_path / "checkpoints").iterdir():
        damage(checkpoint / "model_tokenizer.safetensors", "truncate")
    with pytest.raises(CorruptFileError, match=r"no usable checkpoint .*delete"):
        train_tokenizer(tiny(tmp_path))


@pytest.mark.parametrize("kind, overrides, counted", [
    ("gumbel", ["model.quantizer.kind=gumbel", "model.quantizer.tau_anneal_steps=4"], 6),
    ("adaptive", ["model.quantizer.kind=adaptive", "model.quantizer.codebook_size=512", "model.quantizer.capacity=32",
                  "model.quantizer.ladder_dims=[8,4]", "model.quantizer.selector_heads=2", "schedule.mode=deferred", "schedule.ae_steps=2",
                  "schedule.kmeans_batches=1"], 4),
])
def test_temperature_counts_optimizer_steps_not_forward_passes(tmp_path, kind, overrides, counted):
    """With 3 micro-batches per update the schedule still advances once per optimizer step (quantized steps)."""
    cfg = load_config(TokenizerRunConfig, TINY, [f"output_dir={tmp_path}", "train.steps=6", "train.grad_accum=3",
                                                 "train.batch_size=4", *overrides])
    train_tokenizer(cfg)
    assert int(weights(tmp_path)["quantizer.num_steps"]) == counted
    if kind == "gumbel":  # the temperature used at step s is the schedule at s - 1 completed updates
        q = cfg.model.quantizer
        for record in (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()):
            expected = float(exponential_tau(torch.tensor(record["step"] - 1), q.tau_start, q.tau_end,
                                             q.tau_anneal_steps))
            assert math.isclose(record["tau"], expected, rel_tol=1e-6), record


@pytest.mark.parametrize("kind", ["vq", "ema", "gumbel"])
def test_dead_code_state_travels_in_the_state_dict(kind):
    """A quantizer rebuilt from a state dict mid-window checks and re-seeds exactly like the original."""
    cfg = QuantizerConfig(kind=kind, codebook_size=8, dim=4, decay=0.5, dead_code_threshold=0.5, dead_code_window=3)
    torch.manual_seed(0)
    q = build_quantizer(cfg).train()
    batches = [torch.full((16, 4), 3.0) + 0.01 * torch.randn(16, 4) for _ in range(8)]
    for z in batches[:4]:  # one reset at the 3rd forward, then one forward into the next window
        q(z)
    state = q.state_dict()
    assert state["dead_code_state"].tolist() == [1, 1]
    other = build_quantizer(cfg).train()
    other.load_state_dict(state)
    for z in batches[4:]:
        torch.manual_seed(1)
        a = q(z)
        torch.manual_seed(1)
        b = other(z)
        assert torch.equal(a.indices, b.indices)
    for key, value in q.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    assert q.state_dict()["dead_code_state"].tolist() == [2, 2]
    # a state dict saved before the counters were recorded still loads (the window starts afresh)
    old = {k: v for k, v in state.items() if k != "dead_code_state"}
    fresh = build_quantizer(cfg)
    fresh.load_state_dict(old)
    assert fresh.state_dict()["dead_code_state"].tolist() == [0, 0]


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')

    class Main:
        is_main_process = True

    MetricsLogger(path, Main(), resume_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
