"""Every YAML file shipped in configs/ loads into its dataclass (no stale or misspelt keys)."""

from pathlib import Path

import pytest

from pipelines.evaluate import EvalConfig
from pipelines.run import expand_sweeps, load_experiment
from pipelines.train_prior import PriorRunConfig
from pipelines.train_tokenizer import TokenizerRunConfig
from tokenizer.config import load_config
from tokenizer.model import VQVAE

REPO = Path(__file__).resolve().parents[1]


def shipped(folder: str) -> list[Path]:
    paths = sorted((REPO / "configs" / folder).glob("*.yaml"))
    assert paths, folder
    return paths


@pytest.mark.parametrize("path", shipped("tokenizer"), ids=lambda p: p.name)
def test_tokenizer_configs(path):
    cfg = load_config(TokenizerRunConfig, path)
    if cfg.model.quantizer.kind == "adaptive":
        assert all(n * d == cfg.model.quantizer.capacity for n, d in cfg.model.quantizer.ladder())


@pytest.mark.parametrize("path", shipped("prior"), ids=lambda p: p.name)
def test_prior_configs(path):
    load_config(PriorRunConfig, path, ["tokens=runs/x/tokens"])


@pytest.mark.parametrize("path", shipped("eval"), ids=lambda p: p.name)
def test_eval_configs(path):
    load_config(EvalConfig, path)


@pytest.mark.parametrize("path", shipped("experiments"), ids=lambda p: p.name)
def test_experiment_configs(path, monkeypatch):
    monkeypatch.chdir(REPO)  # section files are given relative to the repository root
    for experiment in expand_sweeps([str(path)])[0]:
        cfg = load_experiment(experiment)
        assert cfg.tokenizer.output_dir.startswith(cfg.output_dir)


def test_quickstart_builds_its_model():
    cfg = load_experiment(REPO / "configs" / "experiments" / "quickstart.yaml")
    assert VQVAE(cfg.tokenizer.model).config.grid == (8, 8)
