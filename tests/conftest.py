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
