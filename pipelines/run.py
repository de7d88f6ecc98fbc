"""Run an experiment end to end: train tokenizer -> encode -> train prior -> sample -> evaluate.

    vqgen run --config configs/experiments/quickstart.yaml
    python -m pipelines.run --config configs/experiments/quickstart.yaml stages.prior.train.steps=100
    vqgen run --config A.yaml --config B.yaml --compare-dir runs/a_vs_b   # several, plus a comparison
    vqgen run --config configs/experiments/sweep_mnist_deferred.yaml      # a sweep file listing experiments

In an experiment file each stage section is either a mapping or the path of a YAML file holding it (e.g.
``tokenizer: configs/tokenizer/mnist_ema_deferred.yaml``; paths relative to the working directory).
Every stage writes into one run folder (``RUN/tokenizer``, ``RUN/tokens``, ``RUN/prior``, ``RUN/samples``,
``RUN/report.json``, ``RUN/report.html``). A stage whose result is already complete is skipped; a stage that
was interrupted resumes from its newest checkpoint. Each stage can also be run by itself under
``accelerate launch`` (see README); this runner calls the same functions in one process.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tokenizer.config import ConfigError, from_dict, merge, parse_overrides, read_yaml, save_config
from tokenizer.io import load_json

from pipelines.common import die
from pipelines.encode import encode
from pipelines.evaluate import EvalConfig, compare_runs, evaluate_run
from pipelines.sample import sample
from pipelines.train_prior import PriorRunConfig, train_prior
from pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from prior.sampling import SamplingConfig

STAGES = ("tokenizer", "encode", "prior", "sample", "evaluate")
SECTIONS = ("tokenizer", "encode", "prior", "sample", "evaluate")  # may be inline mappings or YAML file paths


@dataclass
class EncodeStageConfig:
    """Settings of the encode stage inside an experiment."""

    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    batch_size: int = 256


@dataclass
class ExperimentConfig:
    """One experiment: a run folder and the settings of each stage (paths between stages are set here)."""

    name: str = "experiment"
    output_dir: str = "runs/experiment"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    tokenizer: TokenizerRunConfig = field(default_factory=TokenizerRunConfig)
    encode: EncodeStageConfig = field(default_factory=EncodeStageConfig)
    prior: PriorRunConfig = field(default_factory=lambda: PriorRunConfig(tokens="<set by the runner>"))
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages has {unknown[0]!r}; choose among {', '.join(STAGES)}")


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()):
    """Read an experiment YAML (+ ``key=value`` overrides) and wire the stage folders into the run folder."""
    cls = ExperimentConfig
    data = read_yaml(path) if path else {}
    for section in SECTIONS:
        if isinstance(data.get(section), str):  # a section given as the path of a YAML file holding it
            data[section] = read_yaml(data[section])
    data = merge(data, parse_overrides(list(overrides)))
    run = Path(data.get("output_dir", cls.output_dir))
    wired = {
        "tokenizer": {"output_dir": str(run / "tokenizer")},
        "prior": {"output_dir": str(run / "prior"), "tokens": str(run / "tokens")},
    }
    for section, keys in wired.items():
        given = data.get(section) or {}
        for key in keys:
            if key in given:
                raise ConfigError(
                    f"{section}.{key} is set by the experiment runner (inside output_dir={run}); remove it"
                    + (f" from {path}" if path else "")
                )
        data[section] = merge(given, keys)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{err}" + (f" (in {path})" if path else "")) from None


def _complete(path: Path, steps: int | None = None) -> bool:
    """A stage's result file exists (and, for trainers, was written for the configured number of steps).

    A trainer's summary records the configured ``steps``; it is complete when training reached them or was
    stopped earlier by early stopping (``early_stopped``, ``stopped_step`` < ``steps``).
    """
    if not path.is_file():
        return False
    if steps is None:
        return True
    summary = load_json(path)
    if summary.get("steps") != steps:
        return False
    stopped = summary.get("stopped_step", steps)  # summaries from before early stopping have no stopped_step
    return stopped == steps or (summary.get("early_stopped") is True and stopped < steps)


def run_experiment(cfg, force: Sequence[str] = ()) -> dict:
    """Run the configured stages into ``cfg.output_dir``; returns the evaluation report (or {})."""

    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "experiment.yaml")
    done = lambda stage, ok: ok and stage not in force  # noqa: E731
    report: dict = {}
    for stage in cfg.stages:
        if stage == "tokenizer":
            if done(stage, _complete(run / "tokenizer" / "summary.json", cfg.tokenizer.train.steps)):
                print("[run] tokenizer: complete, skipped")
                continue
            print("[run] tokenizer: training")
            train_tokenizer(cfg.tokenizer)
        elif stage == "encode":
            print("[run] encode")
            encode(run / "tokenizer", run / "tokens", cfg.encode.splits, overwrite=stage in force,
                   batch_size=cfg.encode.batch_size)
        elif stage == "prior":
            if done(stage, _complete(run / "prior" / "summary.json", cfg.prior.train.steps)):
                print("[run] prior: complete, skipped")
                continue
            print("[run] prior: training")
            train_prior(cfg.prior)
        elif stage == "sample":
            if done(stage, (run / "samples" / "meta.json").is_file()):
                print("[run] sample: complete, skipped")
                continue
            print("[run] sample")
            sample(run / "prior" / "model", run / "samples", cfg.sample, tokenizer_dir=run / "tokenizer" / "model")
        elif stage == "evaluate":
            if done(stage, (run / "report.json").is_file()):
                print("[run] evaluate: complete, skipped")
                report = json.loads((run / "report.json").read_text())
                continue
            print("[run] evaluate")
            report = evaluate_run(run, cfg.evaluate)
    return report


def headline(report: dict) -> str:
    """A few numbers to print at the end of a run."""
    tok, gen = report.get("tokenizer", {}), report.get("generation", {})
    parts = []
    for label, section, key in (
        ("recon MSE", tok, "recon_mse"), ("PSNR", tok, "psnr"), ("perplexity", tok, "perplexity"),
        ("usage", tok, "usage"), ("rFID", tok, "rfid"), ("gFID", gen, "fid"), ("recall", gen, "recall"),
        ("coverage", gen, "coverage"), ("mode coverage", gen, "mode_coverage"),
    ):
        value = section.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4g}")
    return ", ".join(parts)


def expand_sweeps(paths: Sequence[str]) -> tuple[list[str], str | None]:
    """Replace each sweep file by the experiment files it lists.

    A sweep file is a YAML mapping ``{experiments: [a.yaml, b.yaml, ...], compare_dir: DIR}``; every other
    file is an experiment itself. Returns (experiment paths, the sweep's comparison folder or None).
    """
    out, compare_dir = [], None
    for path in paths:
        data = read_yaml(path)
        if "experiments" not in data:
            out.append(path)
            continue
        unknown = sorted(set(data) - {"experiments", "compare_dir"})
        if unknown or not isinstance(data["experiments"], list) or not data["experiments"]:
            raise ConfigError(
                f"sweep file {path} must hold only 'experiments' (a non-empty list of experiment YAML files) "
                f"and optionally 'compare_dir'" + (f"; unknown key '{unknown[0]}'" if unknown else "")
            )
        out += [str(p) for p in data["experiments"]]
        compare_dir = data.get("compare_dir", compare_dir)
    return out, compare_dir


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Run experiments end to end (resumable stage by stage).")
    parser.add_argument("--config", action="append", required=True,
                        help="experiment YAML; repeat to run several and compare them")
    parser.add_argument("--compare-dir", default=None, help="where the comparison report goes (several configs)")
    parser.add_argument("--force", default="", help=f"comma-separated stages to redo: {', '.join(STAGES)}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every experiment")
    args = parser.parse_intermixed_args(argv)
    force = [s for s in args.force.split(",") if s]
    if any(s not in STAGES for s in force):
        die(f"--force takes stages among {', '.join(STAGES)}, got {args.force!r}")
    try:
        paths, compare_dir = expand_sweeps(args.config)
        configs = [load_experiment(path, args.overrides) for path in paths]
    except (ConfigError, FileNotFoundError) as err:
        die(str(err))
    reports = []
    for cfg in configs:
        report = run_experiment(cfg, force)
        reports.append(report)
        run = Path(cfg.output_dir)
        print(f"\n[{cfg.name}] done: {run}")
        for name in ("report.html", "report.md", "report.json"):
            if (run / name).is_file():
                print(f"  {name}: {run / name}")
        if report:
            print(f"  {headline(report)}")
    if len(configs) > 1:
        out = Path(args.compare_dir or compare_dir or "runs/comparison")
        compare_runs([c.output_dir for c in configs], out)
        print(f"\ncomparison: {out}")
    return reports


if __name__ == "__main__":
    main()
