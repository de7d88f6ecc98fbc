"""`vqgen run` end to end on a tiny experiment: every artefact exists and a rerun skips finished stages.

Also sweep files (entries with overrides, seeds, precedence, rejected mistakes) and the completeness of an
early-stopped prior.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from PIL import Image

from vqgen.pipelines.cli import main as vqgen
from vqgen.core.trainer import run_complete as _complete
from vqgen.pipelines.run import expand_sweep, load_experiment
from vqgen.pipelines.run import main as vqgen_main
from vqgen.core.config import ConfigError

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
    assert report["generation"]["sampling"]["cfg_scale"] == 1.5 and report["generation"]["sampling"]["num_samples"] == 24
    phases = [json.loads(line)["phase"] for line in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert phases[0] == "ae" and phases[-1] == "quantize"
    assert "[run] wall time: tokenizer" in out and "-core " in out
    # a second run, from the run's own experiment.yaml, finds every stage complete and redoes nothing
    saved = yaml.safe_load((run / "experiment.yaml").read_text())
    assert "output_dir" not in saved["tokenizer"] and "tokens" not in saved["prior"]
    assert vqgen(["run", "--config", str(run / "experiment.yaml")]) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "prior", "sample", "evaluate"):
        assert f"[run] {stage}: complete, skipped" in out
    # the saved file also loads into another folder
    assert load_experiment(run / "experiment.yaml", [f"output_dir={tmp_path / 'again'}"]).tokenizer.output_dir == str(
        tmp_path / "again" / "tokenizer")


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


def write_base(path: Path, **changes) -> Path:
    """tiny.yaml with a name, a folder under runs/ and explicit stage seeds (which a sweep's seed replaces)."""
    data = yaml.safe_load(TINY.read_text())
    data.update(name="base", output_dir="runs/base", **changes)
    data["tokenizer"]["train"]["seed"] = data["prior"]["train"]["seed"] = data["sample"]["seed"] = 5
    path.write_text(yaml.safe_dump(data))
    return path


def test_expand_sweep_precedence_names_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "seeds": [3, 4],
        "overrides": ["tokenizer.train.steps=10", "tokenizer.train.lr=0.5"],
        "experiments": ["base.yaml", {"config": "base.yaml", "name": "wide",
                                      "overrides": ["tokenizer.train.steps=12", "tokenizer.model.hidden=32"]}],
    }))
    cli = ["tokenizer.train.lr=0.25", "prior.train.seed=9"]
    runs, compare_dir = expand_sweep("sweep.yaml", cli)
    assert compare_dir is None
    assert [(r.name, r.output_dir, r.config) for r in runs] == [
        ("base_s3", "runs/base_s3", "base.yaml"), ("base_s4", "runs/base_s4", "base.yaml"),
        ("wide_s3", "runs/wide_s3", "base.yaml"), ("wide_s4", "runs/wide_s4", "base.yaml")]
    # lowest precedence first: sweep overrides, entry overrides, seed (+ its name and folder), command line
    assert runs[3].overrides == ("tokenizer.train.steps=10", "tokenizer.train.lr=0.5", "tokenizer.train.steps=12",
                                 "tokenizer.model.hidden=32", "seed=4", 'name="wide_s4"',
                                 'output_dir="runs/wide_s4"', *cli)
    for run, seed, steps, hidden in zip(runs, [3, 4, 3, 4], [10, 10, 12, 12], [16, 16, 32, 32]):
        cfg = run.load()
        assert (cfg.name, cfg.output_dir, cfg.seed) == (run.name, run.output_dir, seed)
        assert cfg.tokenizer.output_dir == f"{run.output_dir}/tokenizer"
        assert cfg.tokenizer.train.steps == steps and cfg.tokenizer.model.hidden == hidden  # entry > sweep
        assert cfg.tokenizer.train.lr == 0.25  # command line > sweep
        assert cfg.tokenizer.train.seed == cfg.sample.seed == seed  # seed > experiment file
        assert cfg.prior.train.seed == 9  # command line > seed
        assert cfg.evaluate.classifier.seed == 0  # the feature extractor is shared by every seed
    # no seeds: a named entry keeps its name; a plain file is one experiment with the command-line overrides
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"experiments": [
        {"config": "base.yaml", "name": "wide", "overrides": ["tokenizer.model.hidden=32"]}],
        "compare_dir": "runs/cmp"}))
    runs, compare_dir = expand_sweep("plain.yaml")
    assert [(r.name, r.output_dir) for r in runs] == [("wide", "runs/wide")] and compare_dir == "runs/cmp"
    (single,), compare_dir = expand_sweep("base.yaml", cli)
    assert (single.name, single.output_dir, single.overrides, compare_dir) == ("base", "runs/base", tuple(cli), None)


def test_experiment_seed_follows_override_order():
    cfg = load_experiment(TINY, ["seed=3"])
    assert (cfg.tokenizer.train.seed, cfg.prior.train.seed, cfg.sample.seed) == (3, 3, 3)
    assert load_experiment(TINY, ["prior.train.seed=9", "seed=3"]).prior.train.seed == 3
    assert load_experiment(TINY, ["seed=3", "prior.train.seed=9"]).prior.train.seed == 9
    with pytest.raises(ConfigError, match="'seed'"):
        load_experiment(TINY, ["seed=three"])


@pytest.mark.parametrize("sweep, cli, message", [
    ({"experiments": ["base.yaml"], "seed": [1]}, [],
     "unknown key 'seed'; allowed keys: compare_dir, experiments, overrides, seeds"),
    ({"experiments": [{"config": "base.yaml", "seeds": [1]}]}, [],
     r"experiments\[0\]: unknown key 'seeds'; allowed keys: config, name, overrides"),
    ({"experiments": [{"config": "base.yaml", "overrides": ["tokenizer.train.stepz=3"]}]}, [],
     "unknown config key 'tokenizer.train.stepz'"),
    ({"experiments": ["base.yaml"], "overrides": ["prior.model.widht=3"]}, [], "unknown config key 'prior.model.widht'"),
    ({"experiments": ["base.yaml"]}, ["sample.temprature=2"], "unknown config key 'sample.temprature'"),
    ({"experiments": ["base.yaml", "base.yaml"]}, [], "would both write runs/base"),
    ({"experiments": [{"config": "base.yaml", "name": "a"},
                      {"config": "base.yaml", "name": "a", "overrides": ["tokenizer.train.steps=8"]}]}, [],
     r"experiments\[0\] and .*experiments\[1\] would both write runs/a"),
    ({"experiments": ["base.yaml"], "seeds": [0, 1]}, ["output_dir=runs/x"], "seed 0 and .* seed 1 would both write"),
    ({"experiments": [{"name": "a"}]}, [], "'config'"),
    ({"experiments": ["base.yaml"], "seeds": ["a"]}, [], "'seeds' must be"),
    ({"experiments": []}, [], "non-empty list"),
    ({"experiments": [["base.yaml"]]}, [], "experiment file or a mapping"),
    ({"experiments": ["missing.yaml"]}, [], "missing.yaml does not exist"),
])
def test_sweep_mistakes_are_one_clear_error(tmp_path, monkeypatch, sweep, cli, message):
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match=message):
        expand_sweep("sweep.yaml", cli)


def test_vqgen_run_rejects_a_bad_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "base.yaml")
    (tmp_path / "sweep.yaml").write_text("experiments: [base.yaml]\nrepeats: 2\n")
    with pytest.raises(SystemExit):
        vqgen_main(["--config", "sweep.yaml"])
    assert "unknown key 'repeats'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same experiment twice writes one folder
        vqgen_main(["--config", "base.yaml", "--config", "base.yaml"])
    assert "would both write" in capsys.readouterr().err


def test_sweep_runs_entries_times_seeds_and_compares(tmp_path, monkeypatch):
    """Two entries x two seeds of tiny.yaml (tokenizer + report only): four run folders and one comparison."""
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "seeds": [0, 1],
        "overrides": [f"output_dir={tmp_path / 'runs' / 'tiny'}", "stages=[tokenizer, evaluate]"],
        "compare_dir": str(tmp_path / "cmp"),
        "experiments": [str(TINY), {"config": str(TINY), "name": "tiny_vq",
                                    "overrides": ["tokenizer.model.quantizer.kind=vq"]}],
    }))
    reports = vqgen_main(["--config", "sweep.yaml", "tokenizer.train.log_every=3"])
    assert [r["tokenizer"]["quantizer"] for r in reports] == ["ema", "ema", "vq", "vq"]
    names = ["tiny_s0", "tiny_s1", "tiny_vq_s0", "tiny_vq_s1"]
    for name, seed, kind in zip(names, [0, 1, 0, 1], ["ema", "ema", "vq", "vq"]):
        exp = yaml.safe_load((tmp_path / "runs" / name / "experiment.yaml").read_text())
        assert exp["name"] == name and exp["output_dir"] == str(tmp_path / "runs" / name) and exp["seed"] == seed
        assert exp["tokenizer"]["train"]["seed"] == exp["prior"]["train"]["seed"] == exp["sample"]["seed"] == seed
        assert exp["tokenizer"]["model"]["quantizer"]["kind"] == kind and exp["stages"] == ["tokenizer", "evaluate"]
        assert exp["tokenizer"]["train"]["log_every"] == 3
        assert (tmp_path / "runs" / name / "report.json").is_file()
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["table"]
    assert set(table["tokenizer.recon_mse"]) == set(names)
    assert table["tokenizer.recon_mse"]["tiny_s0"] != table["tokenizer.recon_mse"]["tiny_s1"]


@pytest.mark.parametrize("granularity", ["image", "position"])
def test_adaptive_experiment_end_to_end(tmp_path, monkeypatch, granularity):
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    adaptive = ["tokenizer.model.quantizer.kind=adaptive", "tokenizer.model.quantizer.codebook_size=512",
                "tokenizer.model.quantizer.capacity=32",
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


def test_the_module_docstring_examples_load():
    """Every override shown in pipelines/run.py's docstring is one that works."""
    import shlex

    import vqgen.pipelines.run as run_module

    examples = [shlex.split(line.split("#")[0]) for line in run_module.__doc__.splitlines()
                if "--config configs/experiments/quickstart.yaml" in line]
    assert any("=" in arg for words in examples for arg in words)
    for words in examples:
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        cfg = load_experiment(REPO / "configs" / "experiments" / "quickstart.yaml", overrides)
        assert cfg.name == "quickstart"
