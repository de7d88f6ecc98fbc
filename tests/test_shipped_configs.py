"""Every YAML file shipped in configs/ loads into its dataclass (no stale or misspelt keys)."""

from pathlib import Path

import pytest

from vqgen.pipelines.evaluate import EvalConfig
from vqgen.pipelines.run import expand_sweep, load_experiment
from vqgen.pipelines.train_prior import PriorRunConfig
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig
from vqgen.core.config import load_config
from vqgen.tokenizer.model import VQVAE

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
    """Every experiment file, and every experiment of every sweep file (entries, overrides, seeds), loads."""
    monkeypatch.chdir(REPO)  # section and experiment files are given relative to the repository root
    runs, _ = expand_sweep(path.relative_to(REPO))  # also rejects two entries writing one folder
    for run in runs:
        cfg = run.load()
        assert cfg.tokenizer.output_dir.startswith(cfg.output_dir) and cfg.name == run.name
        if path.name.startswith("sweep_") and path.name.endswith("_adaptive.yaml"):
            q = cfg.tokenizer.model.quantizer  # the ladder: every fixed (N, D) and the adaptive one hold W = 65536
            assert (q.capacity if q.kind == "adaptive" else q.codebook_size * q.dim) == 65536


def test_sweeps_cover_both_studies_on_both_data_sets(monkeypatch):
    monkeypatch.chdir(REPO)
    for dataset in ("mnist", "cifar10"):
        ladder = {run.name for run in expand_sweep(f"configs/experiments/sweep_{dataset}_adaptive.yaml")[0]}
        assert ladder == {f"{dataset}_fixed_{2 ** k}x{2 ** (16 - k)}" for k in range(9, 17)} | {f"{dataset}_adaptive"}
        deferred = {run.name: run.load() for run in expand_sweep(f"configs/experiments/sweep_{dataset}_deferred.yaml")[0]}
        assert {(c.tokenizer.schedule.mode, c.tokenizer.model.quantizer.codebook_size) for c in deferred.values()} == {
            (mode, n) for mode in ("early", "deferred") for n in (512, 4096)}


def test_quickstart_builds_its_model():
    cfg = load_experiment(REPO / "configs" / "experiments" / "quickstart.yaml")
    assert VQVAE(cfg.tokenizer.model).config.grid == (8, 8)


def test_quantizer_study_has_early_and_deferred_arms_of_every_new_kind(monkeypatch):
    monkeypatch.chdir(REPO)
    for dataset in ("mnist", "cifar10"):
        runs, _ = expand_sweep(f"configs/experiments/study_quantizers_{dataset}.yaml")
        arms = {}
        for run in runs:
            cfg = run.load()
            q, schedule = cfg.tokenizer.model.quantizer, cfg.tokenizer.schedule
            assert cfg.tokenizer.train.steps == 20000 and cfg.tokenizer.model.hidden == 128  # full size
            arms.setdefault((q.kind, getattr(q, "rotation_trick", False), schedule.mode), set()).add(cfg.seed)
        expected = {(k, r, m) for k, r in (("fsq", False), ("lfq", False), ("simvq", False), ("vq", False),
                                           ("vq", True), ("ema", True)) for m in ("early", "deferred")}
        seeds = {"mnist": set(range(5)), "cifar10": {0, 1, 2}}[dataset]
        assert set(arms) == expected and all(arm_seeds == seeds for arm_seeds in arms.values())
