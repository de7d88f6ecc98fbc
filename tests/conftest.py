"""Shared test fixtures."""

import os

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private VQGEN_CACHE, so tests never touch (or reuse) the user's cache."""
    path = tmp_path_factory.mktemp("vqgen_cache")
    old = os.environ.get("VQGEN_CACHE")
    os.environ["VQGEN_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VQGEN_CACHE")
    else:
        os.environ["VQGEN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny experiment (tokenizer, tokens, prior, samples; no report), made once per session.

    Tests that change files copy it first (``shutil.copytree``); it must stay as it is.
    """
    from pathlib import Path

    from pipelines.run import load_experiment, run_experiment

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny.yaml"
    run_experiment(load_experiment(tiny, [f"output_dir={run}", "stages=[tokenizer, encode, prior, sample]"]))
    return run
