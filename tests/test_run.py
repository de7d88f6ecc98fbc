"""`vqgen run` end to end on a tiny experiment: every artefact exists and a rerun skips finished stages."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from pipelines.cli import main as vqgen
from pipelines.run import _complete, load_experiment
from pipelines.run import main as vqgen_main
from tokenizer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "tiny.yaml"


def test_vqgen_run_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert vqgen(["run", "--config", str(TINY), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "report.json" in out and "recon MSE" in out
    for path in ("experiment.yaml", "tokenizer/config.yaml", "tokenizer/metrics.jsonl", "tokenizer/summary.json",
                 "tokenizer/model/model.safetensors", "tokens/meta.json", "prior/summary.json",
                 "samples/grid.png", "samples/meta.json", "samples/tokens.safetensors", "report.json", "report.html"):
        assert (run / path).is_file(), path
    tokens = load_file(str(run / "samples" / "tokens.safetensors"))
    assert tuple(tokens["tokens"].shape) == (24, 4, 4)
    assert len(list((run / "samples" / "images").glob("*.png"))) == 24
    assert Image.open(run / "samples" / "images" / "00000.png").size == (16, 16)
    report = json.loads((run / "report.json").read_text())
    for section, keys in {
        "tokenizer": ["recon_mse", "psnr", "ssim", "perplexity", "usage", "code_distance", "rfid"],
        "generation": ["fid", "kid", "precision", "recall", "density", "coverage", "mode_coverage", "token_perplexity"],
    }.items():
        for key in keys:
            assert isinstance(report[section][key], (int, float)), f"{section}.{key}"
    assert report["feature_extractor"]["name"]
    phases = [json.loads(line)["phase"] for line in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert phases[0] == "ae" and phases[-1] == "quantize"
    # a second run finds every stage complete and redoes nothing
    assert vqgen(["run", "--config", str(TINY), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "prior", "sample", "evaluate"):
        assert f"[run] {stage}: complete, skipped" in out


def test_runner_owns_stage_paths(tmp_path):
    with pytest.raises(ConfigError, match="set by the experiment runner"):
        load_experiment(TINY, [f"output_dir={tmp_path}", "prior.tokens=elsewhere"])
    with pytest.raises(ConfigError, match="stages"):
        load_experiment(TINY, [f"output_dir={tmp_path}", "stages=[tokenizer, fly]"])


def test_early_stopped_prior_counts_as_complete(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["run", "--config", str(TINY), f"output_dir={run}", "stages=[tokenizer, encode, prior]",
            "prior.train.eval_every=2", "prior.train.early_stopping_patience=1",
            "prior.train.early_stopping_min_delta=100"]  # no gain is that large: stops at the 2nd evaluation
    assert vqgen(args) == 0
    summary = json.loads((run / "prior" / "summary.json").read_text())
    assert summary["early_stopped"] and summary["stopped_step"] == 4 and summary["steps"] == 6
    capsys.readouterr()
    assert vqgen(args) == 0
    assert "[run] prior: complete, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("summary, complete", [
    ({"steps": 6}, True),  # a summary from before early stopping
    ({"steps": 6, "stopped_step": 6, "early_stopped": False}, True),
    ({"steps": 6, "stopped_step": 4, "early_stopped": True}, True),
    ({"steps": 6, "stopped_step": 4, "early_stopped": False}, False),
    ({"steps": 5, "stopped_step": 5, "early_stopped": False}, False),  # trained for another budget
    ({"steps": 5, "stopped_step": 4, "early_stopped": True}, False),
])
def test_complete_checks_the_configured_steps(tmp_path, summary, complete):
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert _complete(tmp_path / "summary.json", 6) is complete
    assert not _complete(tmp_path / "missing.json", 6)


def test_sweep_runs_several_and_compares(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name, kind in (("a", "vq"), ("b", "ema")):
        text = TINY.read_text().replace("output_dir: runs/tiny", f"output_dir: {tmp_path / name}")
        text = text.replace("kind: ema", f"kind: {kind}")
        (tmp_path / f"{name}.yaml").write_text(text + "stages: [tokenizer, evaluate]\n")
    (tmp_path / "sweep.yaml").write_text(f"experiments: [a.yaml, b.yaml]\ncompare_dir: {tmp_path / 'cmp'}\n")
    reports = vqgen_main(["--config", "sweep.yaml"])
    assert len(reports) == 2 and reports[0]["tokenizer"]["quantizer"] == "vq"
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["table"]
    assert set(table["tokenizer.recon_mse"]) == {"a", "b"}
    with pytest.raises(SystemExit):
        (tmp_path / "bad.yaml").write_text("experiments: []\n")
        vqgen_main(["--config", "bad.yaml"])


@pytest.mark.parametrize("granularity", ["image", "position"])
def test_adaptive_experiment_end_to_end(tmp_path, monkeypatch, granularity):
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    adaptive = ["tokenizer.model.quantizer.kind=adaptive", "tokenizer.model.quantizer.capacity=32",
                "tokenizer.model.quantizer.ladder_dims=[8,4,2,1]",
                f"tokenizer.model.quantizer.granularity={granularity}", "tokenizer.model.quantizer.selector_heads=2"]
    assert vqgen(["run", "--config", str(TINY), f"output_dir={run}", *adaptive]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["tokenizer"]["quantizer"] == "adaptive"
    tokens = load_file(str(run / "samples" / "tokens.safetensors"))["tokens"]
    offsets = torch.tensor([0, 4, 12, 28])  # ladder 32/8, 32/4, 32/2, 32/1 codes
    book = torch.bucketize(tokens, offsets, right=True) - 1  # (N, h, w) codebook of every token
    assert int(tokens.max()) < 60
    if granularity == "image":
        assert (book == book[:, :1, :1]).all()  # one codebook per sampled image
