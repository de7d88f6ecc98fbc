"""The stages of an experiment, each described once: ``STAGES``.

A :class:`Stage` names its module (whose ``main`` is its command, ``python -m <module>`` and ``vqgen <command>``),
its config class (a section of an experiment), what it writes inside a run folder, where its record lives, which
config keys cannot change its result, which keys the runner wires inside the run folder and which one follows
the experiment's ``seed``. Its module provides the three functions the runner calls::

    stage_record(cfg, run) -> dict   the record it would get now: its config and the sha256 of its inputs
    stage_complete(cfg, run) -> bool whether the run folder holds its finished result for these settings
    run_stage(cfg, run) -> dict|None compute it inside the run folder (resuming or continuing where it can)

``vqgen run`` (``pipelines/run.py``), the ``ExperimentConfig`` it reads, the stage records and the ``vqgen``
command all read this table; adding a stage is one entry here and those three functions in its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vqgen.core.config import read_yaml
from vqgen.core.errors import UserError
from vqgen.core.io import load_json
from vqgen.core.records import STAGE_RECORD, make_record

# how a run computes, not what: resumable either way
_CADENCE = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.trackers",
            "train.num_workers", "train.compile", "train.fused")


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment (see the module docstring)."""

    name: str  # in stages=[...], --force and the experiment file's section
    module: str  # python -m <module>; provides main, stage_record, stage_complete, run_stage
    command: str  # vqgen <command>
    help: str
    config_class: str  # the config dataclass in ``module``
    outputs: tuple[str, ...]  # what it writes inside a run folder (removed by --force)
    record_path: str  # its record, relative to the run folder
    ignored: tuple[str, ...] = ()  # config keys that cannot change its result (not compared)
    trainer: bool = False  # a trainer: train.steps / batch_size / grad_accum may change between runs
    wired: Callable[[Path], dict] = lambda run: {}  # settings the runner sets inside the run folder
    seed_key: tuple[str, ...] | None = None  # where the experiment's seed goes in this section
    defaults: dict = field(default_factory=dict)  # the section's defaults inside an experiment
    # the files its completeness is judged by, relative to its folder (the run folder for evaluate), listed with
    # their sizes in its record, written last (pipelines.completion)
    result_files: tuple[str, ...] = ()

    @property
    def impl(self):
        return importlib.import_module(self.module)

    @property
    def config_cls(self) -> type:
        return getattr(self.impl, self.config_class)

    def default_config(self) -> Any:
        return self.config_cls(**self.defaults)

    def record(self, cfg: Any, run: Path) -> dict:
        return self.impl.stage_record(cfg, run)

    def complete(self, cfg: Any, run: Path) -> bool:
        """Its module says the result is there for these settings, and (for a stage with result files) every one
        exists as its record, written last, lists it (``pipelines.completion``)."""
        if self.result_files:
            from vqgen.pipelines.completion import outputs_complete

            last = "summary.json" if self.trainer else None
            if not outputs_complete(run / self.record_path, self.folder(run), self.result_files, last):
                return False
        return self.impl.stage_complete(cfg, run)

    def run(self, cfg: Any, run: Path) -> Any:
        return self.impl.run_stage(cfg, run)

    def folder(self, run: Path) -> Path:
        """Where its result files lie (its output folder; the run folder for a stage of top-level files)."""
        return run / self.outputs[0] if len(self.outputs) == 1 else run

    def produced(self, run: Path) -> bool:
        """Whether the run folder holds anything of this stage's to keep (a trainer stopped before its first
        checkpoint, e.g. by a non-finite loss, produced nothing: ``completion.produced_nothing``)."""
        if self.trainer:
            from vqgen.pipelines.completion import produced_nothing

            return not produced_nothing(run / self.outputs[0])
        return any((run / name).exists() for name in self.outputs if name != self.record_path)


STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", "vqgen.pipelines.train_tokenizer", "train-tokenizer", "train a VQ-VAE tokenizer (stage 1)",
          "TokenizerRunConfig", ("tokenizer",), "tokenizer/" + STAGE_RECORD,
          ignored=("output_dir", *_CADENCE, "train.recon_every", "data.cache_in_memory", "data.cache_dir",
                   "model.activation_checkpointing"),  # recon grids are drawn outside the random streams
          trainer=True,
          wired=lambda run: {"output_dir": str(run / "tokenizer")}, seed_key=("train", "seed"),
          result_files=("model/config.json", "model/model.safetensors", "summary.json")),
    Stage("encode", "vqgen.pipelines.encode", "encode", "turn a data set into token ids with a trained tokenizer",
          "EncodeConfig", ("tokens",), "tokens/" + STAGE_RECORD,
          # each encoded split records its own tokenizer and data; the prior fingerprints the files it uses
          ignored=("splits",)),
    Stage("prior", "vqgen.pipelines.train_prior", "train-prior", "train a GPT prior on token ids (stage 2)",
          "PriorRunConfig", ("prior",), "prior/" + STAGE_RECORD,
          ignored=("output_dir", "tokens", *_CADENCE, "model.attn_implementation", "model.sdpa_backend"), trainer=True,
          wired=lambda run: {"output_dir": str(run / "prior"), "tokens": str(run / "tokens")},
          seed_key=("train", "seed"), defaults={"tokens": "<set by the runner>"},
          result_files=("model/config.json", "model/model.safetensors", "model/vqgen_prior.json", "summary.json")),
    Stage("sample", "vqgen.pipelines.sample", "sample", "sample images from a prior", "SamplingConfig",
          ("samples",), "samples/" + STAGE_RECORD, seed_key=("seed",)),
    Stage("evaluate", "vqgen.pipelines.evaluate", "evaluate", "reconstruction, FID, diversity and shrinkage reports",
          "EvalConfig", ("report.json", "report.md", "report.html", "report_files", "report_stage.json"),
          "report_stage.json", result_files=("report.json", "report.md", "report.html")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
IGNORED: dict[str, tuple[str, ...]] = {s.name: s.ignored for s in STAGES}


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def legacy_record(stage: str, folder: Path) -> dict | None:
    """A record rebuilt from what a stage folder written before records existed holds (None: nothing usable).

    The trainers' ``config.yaml`` and the sampler's ``meta.json`` hold their resolved configs; of the inputs
    only what those folders name is compared (a finished prior's tokenizer, the sampler's prior and tokenizer).
    """
    try:
        if stage == "tokenizer" and (folder / "config.yaml").is_file():
            return {**make_record(stage, read_yaml(folder / "config.yaml")), "inputs": None}
        if stage == "prior" and (folder / "config.yaml").is_file():
            record = make_record(stage, read_yaml(folder / "config.yaml"))
            saved = folder / "model" / "vqgen_prior.json"  # a finished prior names its tokenizer
            if not saved.is_file():
                return {**record, "inputs": None}
            tokenizer = (load_json(saved).get("tokenizer") or {}).get("fingerprint")
            return {**record, "inputs": {"tokenizer": tokenizer} if tokenizer else None, "partial_inputs": True}
        if stage == "sample" and (folder / "meta.json").is_file():
            meta = load_json(folder / "meta.json")
            inputs = {"prior": (meta.get("prior") or {}).get("fingerprint"),
                      "tokenizer": (meta.get("tokenizer") or {}).get("fingerprint")}
            return {**make_record(stage, meta.get("sampling") or {}),
                    "inputs": {k: v for k, v in inputs.items() if v}, "partial_inputs": True}
    except (UserError, AttributeError):
        return None
    return None



