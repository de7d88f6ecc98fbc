"""Plumbing every stage shares: configs, files, errors, the training engine, distributed helpers, hub sharing
and provenance. Imports nothing of the stage packages."""
