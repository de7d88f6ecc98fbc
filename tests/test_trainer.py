"""The one trainer: continuing (longer, rescaled, on more processes), fine-tuning, the weight EMA, and its
checkpoints holding no pickles."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqgen.core.config import load_config
from vqgen.core.errors import UserError
from vqgen.core.records import STAGE_RECORD, StaleStageError
from vqgen.pipelines.encode import encode
from vqgen.pipelines.train_prior import PriorRunConfig, train_prior
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"
TINY_PRIOR = REPO / "configs" / "prior" / "tiny.yaml"


def tokenizer(folder: Path, *overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, TINY, [f"output_dir={folder}", "train.deterministic=true",
                                                  "train.checkpoint_every=2", "train.keep_checkpoints=10", *overrides])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ continuing
def test_extending_a_finished_tokenizer_continues_from_its_last_step(tmp_path, capsys):
    """steps 4 -> 8 on a finished run: no restart (the steps before are kept), the record says "extended", and the
    cosine schedule continues on the curve of the new total (the documented rule)."""
    run = tmp_path / "tok"
    train_tokenizer(tokenizer(run, "train.steps=4", "train.lr_schedule=cosine"))
    before = metrics(run)
    capsys.readouterr()
    summary = train_tokenizer(tokenizer(run, "train.steps=8", "train.lr_schedule=cosine"))
    err = capsys.readouterr().err
    assert "continuing" in err and "steps 4 -> 8" in err and "extended" in err
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[:4] == before  # continued, not restarted
    record = json.loads((run / STAGE_RECORD).read_text())
    assert record["config"]["train"]["steps"] == 8
    assert record["continued"] == [{"at_step": 4, "changes": ["steps 4 -> 8"]}]
    assert summary["continued"] == record["continued"] and summary["steps"] == 8
    # the rule: after the extension the learning rate is the cosine of the 8-step schedule at that step
    lr = 1e-3  # tiny.yaml
    for r in rows[4:]:
        assert r["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * r["step"] / 8)), rel=1e-6)


def test_lowering_steps_below_what_was_trained_is_refused(tmp_path):
    run = tmp_path / "tok"
    train_tokenizer(tokenizer(run, "train.steps=4"))
    with pytest.raises(StaleStageError, match="trained 4 steps already, more than train.steps=2"):
        train_tokenizer(tokenizer(run, "train.steps=2"))


def test_other_changes_are_still_refused(tmp_path):
    run = tmp_path / "tok"
    train_tokenizer(tokenizer(run, "train.steps=4"))
    with pytest.raises(StaleStageError, match=r"train.lr: 0.001 -> 0.002.*only train.steps, train.batch_size"):
        train_tokenizer(tokenizer(run, "train.steps=6", "train.lr=0.002"))


def test_resuming_with_another_batch_size_keeps_the_position_by_samples_seen(tmp_path, capsys):
    run = tmp_path / "tok"
    assert train_tokenizer(tokenizer(run, "train.steps=6", "train.batch_size=8"), stop_after=2)["stopped_early"]
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer.json").read_text())
    assert state["samples_seen"] == 16
    capsys.readouterr()
    train_tokenizer(tokenizer(run, "train.steps=6", "train.batch_size=4"))
    err = capsys.readouterr().err
    assert "batch_size 8 -> 4" in err and "rescaled" in err
    final = json.loads((run / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert final["samples_seen"] == 16 + 4 * 4 and final["batch_size"] == 4
    record = json.loads((run / STAGE_RECORD).read_text())
    assert record["continued"] == [{"at_step": 2, "changes": ["batch_size 8 -> 4"]}]


def _launch(args: list[str], processes: int, log: Path) -> None:
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VQGEN_NO_PROGRESS": "1"}
    launch = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(29500 + os.getpid() % 400)]
    launch += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    with open(log, "a") as out:
        proc = subprocess.run(launch + args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_a_run_begun_on_one_process_continues_on_two(tmp_path):
    """Interrupted after 2 steps on one process, resumed under --multi_gpu with 2 (gloo on a CPU): it continues
    from the checkpoint (position by samples seen), the new process seeded and stated, the replicas identical."""
    run, log = tmp_path / "tok", tmp_path / "log.txt"
    base = ["-m", "vqgen.pipelines.train_tokenizer", "--config", str(TINY), "--output-dir", str(run),
            "train.checkpoint_every=2", "train.batch_size=4"]
    _launch(base + ["train.steps=2"], 1, log)
    _launch(base + ["train.steps=4"], 2, log)
    text = log.read_text()
    assert "num_processes 1 -> 2" in text and "has no saved random state" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replica_max_abs_diff"] == 0.0
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    assert state["samples_seen"] == 2 * 4 + 2 * 4 * 2 and state["num_processes"] == 2


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_fine_tuning_a_tokenizer_starts_from_the_weights_with_a_fresh_optimizer(tmp_path):
    source = tmp_path / "source"
    train_tokenizer(tokenizer(source, "train.steps=4"))
    tuned = tmp_path / "tuned"
    cfg = tokenizer(tuned, "train.steps=1", "train.lr=1e-12", f"init_from={source}")
    summary = train_tokenizer(cfg)
    start, after = weights(source), weights(tuned)
    # one step at a tiny rate from the source's weights (a fresh start would be far from them); the EMA codebook
    # moves by its own update, not by the rate, so the network's weights are compared
    network = [k for k in start if k.startswith(("encoder.", "decoder."))]
    assert max(float((start[k].float() - after[k].float()).abs().max()) for k in network) < 1e-6
    record = json.loads((tuned / STAGE_RECORD).read_text())
    assert record["inputs"]["init_from"] == summary["init_from"]["sha256"]
    assert f"init_from: {source}" in (tuned / "model" / "README.md").read_text()  # on the model card
    fresh = tmp_path / "fresh"
    train_tokenizer(tokenizer(fresh, "train.steps=1", "train.lr=1e-12"))
    assert max(float((start[k].float() - weights(fresh)[k].float()).abs().max()) for k in network) > 1e-3


def test_fine_tuning_refuses_weights_of_another_architecture(tmp_path):
    source = tmp_path / "source"
    train_tokenizer(tokenizer(source, "train.steps=2"))
    with pytest.raises(UserError, match="do not fit this tokenizer"):
        train_tokenizer(tokenizer(tmp_path / "tuned", "train.steps=1", "model.hidden=32", f"init_from={source}"))
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer(tokenizer(tmp_path / "t2", f"init_from={tmp_path / 'nowhere'}"))


def _tokens(tmp_path: Path, name: str, steps: int) -> Path:
    run = tmp_path / name
    train_tokenizer(tokenizer(run, f"train.steps={steps}"))
    encode(run, tmp_path / f"{name}_tokens", ["train", "validation"])
    return tmp_path / f"{name}_tokens"


def prior(folder: Path, tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, TINY_PRIOR, [f"output_dir={folder}", f"tokens={tokens}",
                                                    "train.deterministic=true", *overrides])


def test_fine_tuned_prior_stays_bound_to_its_tokenizer(tmp_path):
    tokens = _tokens(tmp_path, "tok", 2)
    source = tmp_path / "prior"
    train_prior(prior(source, tokens, "train.steps=4"))
    tuned = train_prior(prior(tmp_path / "tuned", tokens, "train.steps=2", f"init_from={source}"))
    assert tuned["init_from"]["path"].endswith("model")
    other = _tokens(tmp_path, "other", 3)  # another tokenizer's tokens
    with pytest.raises(UserError, match="another tokenizer.*stays bound to its tokenizer"):
        train_prior(prior(tmp_path / "wrong", other, "train.steps=2", f"init_from={source}"))


def test_extending_a_finished_prior_continues(tmp_path):
    tokens = _tokens(tmp_path, "tok", 2)
    run = tmp_path / "prior"
    train_prior(prior(run, tokens, "train.steps=4", "train.log_every=1"))
    before = metrics(run)
    summary = train_prior(prior(run, tokens, "train.steps=6", "train.log_every=1"))
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[:4] == [r for r in before if "loss" in r]
    assert summary["continued"][0]["changes"] == ["steps 4 -> 6"]


# ------------------------------------------------------------------------------------------------ weight EMA
def test_weight_ema_with_decay_zero_is_the_raw_weights(tmp_path):
    train_tokenizer(tokenizer(tmp_path / "raw", "train.steps=3"))
    train_tokenizer(tokenizer(tmp_path / "ema0", "train.steps=3", "train.ema_decay=0.0"))
    assert identical(weights(tmp_path / "raw"), weights(tmp_path / "ema0"))


def test_weight_ema_is_the_saved_model_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_tokenizer(tokenizer(full, "train.steps=6", "train.ema_decay=0.9"))
    assert train_tokenizer(tokenizer(part, "train.steps=6", "train.ema_decay=0.9"), stop_after=3)["stopped_early"]
    train_tokenizer(tokenizer(part, "train.steps=6", "train.ema_decay=0.9"))
    assert identical(weights(full), weights(part))
    raw = tmp_path / "raw"
    train_tokenizer(tokenizer(raw, "train.steps=6"))
    ema, plain = weights(full), weights(raw)
    # the same training (the EMA does not feed back), saved as the average: different parameters
    assert not identical(ema, plain)
    checkpoint = full / "checkpoints" / "step_00000006"
    averaged = load_file(str(checkpoint / "ema_main.safetensors"))
    for name, value in averaged.items():
        assert torch.equal(ema[name], value)


# ------------------------------------------------------------------------------------------------ no pickles
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vqgen_trainer_pickle_ran",))


@pytest.mark.parametrize("name", ["optimizer_tokenizer.pt", "scheduler_tokenizer.pt", "rng_0.pt"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, capsys, name):
    marker = Path("/tmp/vqgen_trainer_pickle_ran")
    marker.unlink(missing_ok=True)
    part = tmp_path / "part"
    train_tokenizer(tokenizer(part, "train.steps=6"), stop_after=4)
    bad = part / "checkpoints" / "step_00000004" / name
    with open(bad, "wb") as f:
        pickle.dump(_Payload(), f)
    # the sha256 no longer matches; even loaded directly, weights_only refuses the payload
    from vqgen.core.trainer import _torch_load

    with pytest.raises(pickle.UnpicklingError):
        _torch_load(bad)
    train_tokenizer(tokenizer(part, "train.steps=6"))
    assert "is unusable" in capsys.readouterr().err
    assert not marker.exists()


def test_an_interrupt_while_a_checkpoint_is_fingerprinted_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Ctrl-C can land after the files are written but before the rename (sha256 of a large model takes a
    while): the temporary folder goes, the checkpoints before stay, and the rerun resumes from them."""
    import vqgen.core.trainer as trainer_module

    run = tmp_path / "tok"
    real = trainer_module.file_fingerprint
    calls = {"n": 0}

    def interrupted_at_the_second_checkpoint(path):
        if path.parent.name == ".step_00000004.tmp":
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(trainer_module, "file_fingerprint", interrupted_at_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(tokenizer(run, "train.steps=6"))
    assert calls["n"] == 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000002"], names
    monkeypatch.setattr(trainer_module, "file_fingerprint", real)
    train_tokenizer(tokenizer(run, "train.steps=6"))
    assert [r["step"] for r in metrics(run)] == list(range(1, 7))
