"""A finished stage is only reused for the same config and inputs; ``--force`` really starts over; a trainer never
resumes a checkpoint of another config or other tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from vqgen.pipelines.run import load_experiment, run_experiment
from vqgen.pipelines.run import main as vqgen_run
from vqgen.core.records import STAGE_RECORD, StaleStageError, changes
from vqgen.pipelines.stages import IGNORED
from vqgen.pipelines.train_prior import PriorRunConfig, train_prior
from vqgen.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "experiments" / "tiny.yaml")
UP_TO_SAMPLE = "stages=[tokenizer, encode, prior, sample]"


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the finished tiny experiment."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def vqgen(run: Path, *args: str) -> None:
    vqgen_run(["--config", TINY, f"output_dir={run}", *args])


def test_changes_names_keys_and_skips_ignored_ones():
    old = {"output_dir": "a", "model": {"quantizer": {"codebook_size": 16}}, "train": {"log_every": 5, "lr": 1e-3}}
    new = {"output_dir": "b", "model": {"quantizer": {"codebook_size": 32}}, "train": {"log_every": 1, "lr": 1e-3}}
    assert changes(old, new, IGNORED["tokenizer"]) == ["model.quantizer.codebook_size: 16 -> 32"]
    assert changes(old, new) == ["model.quantizer.codebook_size: 16 -> 32", 'output_dir: "a" -> "b"',
                                 "train.log_every: 5 -> 1"]


def test_changed_config_is_refused_with_the_keys_and_the_ways_out(run, capsys):
    before = (run / "experiment.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        vqgen(run, UP_TO_SAMPLE, "tokenizer.model.quantizer.codebook_size=32", "prior.train.lr=0.001")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tokenizer: model.quantizer.codebook_size: 16 -> 32" in err and "prior: train.lr: 0.003 -> 0.001" in err
    assert "--force tokenizer" in err and "output_dir" in err
    assert (run / "experiment.yaml").read_text() == before  # nothing was rewritten
    # even a stage that is not run this time is checked: its results would sit beside the new ones
    with pytest.raises(StaleStageError, match="prior: train.lr"):
        run_experiment(load_experiment(TINY, [f"output_dir={run}", "stages=[tokenizer]", "prior.train.lr=0.001"]))


def test_settings_that_cannot_change_a_result_are_not_refused(run, capsys):
    vqgen(run, UP_TO_SAMPLE, "tokenizer.train.log_every=1", "tokenizer.train.checkpoint_every=2",
          "prior.train.keep_checkpoints=5", "encode.splits=[train, validation]", "prior.train.trackers=[]")
    out = capsys.readouterr().out
    for stage in ("tokenizer", "prior", "sample"):
        assert f"[run] {stage}: complete, skipped" in out


def test_force_restarts_the_stage_from_scratch_and_invalidates_later_ones(run, capsys):
    summary = json.loads((run / "tokenizer" / "summary.json").read_text())
    (run / "tokenizer" / "summary.json").write_text(json.dumps({**summary, "old": True}))
    old_checkpoint = run / "tokenizer" / "checkpoints" / "step_00000006"
    assert old_checkpoint.is_dir()
    vqgen(run, "stages=[tokenizer, encode]", "tokenizer.model.quantizer.codebook_size=32", "--force", "tokenizer")
    out = capsys.readouterr().out
    assert "[run] tokenizer: training" in out and "resuming" not in out
    assert "old" not in json.loads((run / "tokenizer" / "summary.json").read_text())  # a new folder, not resumed
    for later in ("prior", "samples"):  # stale results of the old tokenizer are gone
        assert not (run / later).exists(), later
    model = json.loads((run / "tokenizer" / "model" / "config.json").read_text())
    assert model["model"]["quantizer"]["codebook_size"] == 32
    steps = [json.loads(line)["step"] for line in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # one history, from step 1
    record = json.loads((run / "tokens" / STAGE_RECORD).read_text())
    assert record["stage"] == "encode" and len(record["inputs"]["tokenizer"]) == 64
    # the new settings are now the recorded ones: the same command skips, the old one is refused
    vqgen(run, "stages=[tokenizer, encode]", "tokenizer.model.quantizer.codebook_size=32")
    assert "[run] tokenizer: complete, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        vqgen(run, "stages=[tokenizer, encode]")
    assert "codebook_size: 32 -> 16" in capsys.readouterr().err


def test_force_of_a_later_stage_keeps_the_earlier_ones(run, capsys):
    tokenizer_weights = (run / "tokenizer" / "model" / "model.safetensors").read_bytes()
    vqgen(run, UP_TO_SAMPLE, "prior.train.lr=0.001", "--force", "prior")
    out = capsys.readouterr().out
    assert "[run] tokenizer: complete, skipped" in out and "[run] prior: training" in out and "[run] sample\n" in out
    assert (run / "tokenizer" / "model" / "model.safetensors").read_bytes() == tokenizer_weights
    assert yaml.safe_load((run / "prior" / "config.yaml").read_text())["train"]["lr"] == 0.001


def test_changed_inputs_are_refused(run, capsys):
    data = load_file(str(run / "tokens" / "train.safetensors"))
    data["tokens"][0, 0, 0] = (data["tokens"][0, 0, 0] + 1) % 16
    save_file(data, str(run / "tokens" / "train.safetensors"))
    with pytest.raises(SystemExit):
        vqgen(run, UP_TO_SAMPLE)
    err = capsys.readouterr().err
    assert "stage prior" in err and "input train.safetensors" in err and "--force prior" in err


def other_tokens(run: Path, where: Path) -> Path:
    tokens = Path(shutil.copytree(run / "tokens", where))
    data = load_file(str(tokens / "train.safetensors"))
    data["tokens"] = (data["tokens"] + 1) % 16  # the same shapes and vocabulary, other tokens
    save_file(data, str(tokens / "train.safetensors"))
    return tokens


def test_a_prior_never_resumes_on_other_tokens(run, tmp_path):
    config = run / "prior" / "config.yaml"
    stop = dict(stop_after=3)
    cfg = load_config(PriorRunConfig, config, [f"output_dir={tmp_path / 'prior'}", "train.checkpoint_every=1"])
    assert train_prior(cfg, **stop)["stopped_early"]
    foreign = load_config(PriorRunConfig, config, [f"output_dir={tmp_path / 'prior'}", "train.checkpoint_every=1",
                                                   f"tokens={other_tokens(run, tmp_path / 'other')}"])
    with pytest.raises(StaleStageError, match=r"input train.safetensors: .* -> .*--output-dir"):
        train_prior(foreign)
    # the same tokens in another folder (a copy) are the same input: the run resumes and finishes
    same = load_config(PriorRunConfig, config, [f"output_dir={tmp_path / 'prior'}", "train.checkpoint_every=1",
                                                f"tokens={shutil.copytree(run / 'tokens', tmp_path / 'copy')}"])
    assert train_prior(same)["stopped_step"] == 6


def test_folders_from_before_records_are_checked_by_their_config(run, capsys):
    for record in run.rglob(STAGE_RECORD):
        record.unlink()
    with pytest.raises(SystemExit):
        vqgen(run, UP_TO_SAMPLE, "tokenizer.model.hidden=32")
    assert "tokenizer: model.hidden: 16 -> 32" in capsys.readouterr().err
    vqgen(run, UP_TO_SAMPLE)  # the same settings: reused, and the records are written now
    assert "[run] prior: complete, skipped" in capsys.readouterr().out
    assert sorted(p.parent.name for p in run.rglob(STAGE_RECORD)) == ["prior", "samples", "tokenizer", "tokens"]


def test_extending_a_trainer_in_an_experiment_continues_it_and_redoes_what_used_its_result(run, capsys):
    """prior.train.steps raised: the prior continues from its last checkpoint (not from scratch), the samples made
    from the old prior are redone; the tokenizer and its tokens are kept."""
    tiny = load_experiment(TINY, [f"output_dir={run}"])
    steps = tiny.prior.train.steps
    old_samples = load_file(str(run / "samples" / "tokens.safetensors"))["tokens"]
    vqgen(run, UP_TO_SAMPLE, f"prior.train.steps={steps + 4}")
    out = capsys.readouterr()
    assert "[run] tokenizer: complete, skipped" in out.out and "[run] prior: continuing" in out.out
    assert f"continuing {run / 'prior'} from step {steps}" in out.err
    assert "[run] sample: redone, its inputs changed" in out.out
    record = json.loads((run / "prior" / STAGE_RECORD).read_text())
    assert record["continued"] == [{"at_step": steps, "changes": [f"steps {steps} -> {steps + 4}"]}]
    rows = [json.loads(line) for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == steps + 4 and min(r["step"] for r in rows) < steps  # kept history
    new_samples = load_file(str(run / "samples" / "tokens.safetensors"))["tokens"]
    assert new_samples.shape == old_samples.shape
    meta = json.loads((run / "samples" / "meta.json").read_text())
    prior_weights = run / "prior" / "model" / "model.safetensors"
    from vqgen.core.io import file_fingerprint

    assert meta["prior"]["fingerprint"] == file_fingerprint(prior_weights)
