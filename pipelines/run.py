"""Run an experiment end to end: train tokenizer -> encode -> train prior -> sample -> evaluate.

    vqgen run --config configs/experiments/quickstart.yaml
    python -m vqgen.pipelines.run --config configs/experiments/quickstart.yaml prior.train.steps=100 sample.num_samples=200
    vqgen run --config A.yaml --config B.yaml --compare-dir runs/a_vs_b   # several, plus a comparison
    vqgen run --config configs/experiments/sweep_mnist_deferred.yaml      # a sweep file (see expand_sweep)
    vqgen run --config configs/experiments/quickstart.yaml --force prior  # redo the prior and what follows

In an experiment file each stage section is either a mapping or the path of a YAML file holding it (e.g.
``tokenizer: configs/tokenizer/mnist_ema_deferred.yaml``; paths relative to the working directory).
Overrides are ``section.key=value`` with the section names of the file (``tokenizer.train.steps=500``,
``prior.model.n_layer=4``, ``sample.num_samples=100``) or top-level keys (``seed=1``, ``output_dir=runs/x``).
Every stage writes into one run folder (``RUN/tokenizer``, ``RUN/tokens``, ``RUN/prior``, ``RUN/samples``,
``RUN/report.json``, ``RUN/report.html``), with a record of the config and inputs that produced it
(``pipelines.stages``). A stage whose result is complete and was made with the same settings is skipped; an
interrupted one resumes from its newest checkpoint. A stage made with other settings is refused (one message
naming the changed keys) unless ``--force STAGE`` is given, which deletes that stage's output and every later
stage's and runs them from scratch. Each stage can also be run by itself under ``accelerate launch`` (see
README); this runner calls the same functions in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional, Sequence

from vqgen.core.config import ConfigError, from_dict, merge, parse_overrides, read_yaml, save_config, to_dict
from vqgen.core.provenance import machine_summary
from vqgen.core.records import StaleStageError, read_record, record_changes, split_changes, with_provenance, write_record
from vqgen.core.trainer import CONTINUABLE
from vqgen.pipelines.common import add_debug_flag, check_output_dir, entry_point
from vqgen.pipelines.evaluate import compare_runs
from vqgen.core.files import (
    check_inside,
    check_removable_entry,
    check_run_name,
    check_writable_as,
    owns_folder,
    remove_owned,
)
from vqgen.core.io import load_json
from vqgen.pipelines.completion import record_outputs
from vqgen.pipelines.manifest import partial_path
from vqgen.pipelines.stages import STAGE_NAMES, STAGES, Stage, legacy_record, stage
from vqgen.tokenizer.data import DataError, missing_splits


def _validate_experiment(self) -> None:
    unknown = [s for s in self.stages if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"stages has {unknown[0]!r}; choose among {', '.join(STAGE_NAMES)}")


# One section per stage of pipelines.stages.STAGES, in their order, each with the stage's config class.
ExperimentConfig = make_dataclass(
    "ExperimentConfig",
    [("name", str, field(default="experiment")),
     ("output_dir", str, field(default="runs/experiment")),
     ("seed", Optional[int], field(default=None)),
     ("stages", list[str], field(default_factory=lambda: list(STAGE_NAMES))),
     *((s.name, s.config_cls, field(default_factory=s.default_config)) for s in STAGES)],
    namespace={"validate": _validate_experiment, "__module__": __name__, "__doc__": (
        "One experiment: a run folder and the settings of each stage (paths between stages are set here).\n\n"
        "``seed``, when set, is the seed of the tokenizer's and the prior's training and of sampling; the\n"
        "evaluation's feature extractor keeps its own seed, so runs that differ only in ``seed`` are judged by\n"
        "the same classifier.")},
)


def _apply_seed(data: dict) -> dict:
    """Copy the experiment-level ``seed`` (when set) into each stage section's seed (``Stage.seed_key``)."""
    seed = data.get("seed")
    if seed is None:
        return data
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config key 'seed' expects an integer (or null), got {seed!r}")
    for s in STAGES:
        if s.seed_key is None:
            continue
        node = data.setdefault(s.name, {})
        for key in s.seed_key[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # a section that is not a mapping is left for from_dict to reject
            node[s.seed_key[-1]] = seed
    return data


def wired_paths(run: Path) -> dict[str, dict[str, str]]:
    """The stage settings the runner sets inside the run folder ``run`` (never taken from a file)."""
    return {s.name: s.wired(run) for s in STAGES if s.wired(run)}


def save_experiment(cfg, path: Path) -> None:
    """``experiment.yaml`` of a run, without the wired paths: ``vqgen run --config`` reruns it, also into
    another ``output_dir``."""
    data = to_dict(cfg)
    for section, keys in wired_paths(Path(cfg.output_dir)).items():
        for key in keys:
            data[section].pop(key, None)
    save_config(data, path)


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()):
    """Read an experiment YAML (+ ``key=value`` overrides) and wire the stage folders into the run folder.

    Overrides apply in order, later ones win. ``seed`` (in the file or as an override) sets the stage seeds
    (see ``ExperimentConfig``) at its place in that order: an explicit ``prior.train.seed=...`` after it wins.
    """
    cls = ExperimentConfig
    data = read_yaml(path) if path else {}
    for section in STAGE_NAMES:
        if isinstance(data.get(section), str):  # a section given as the path of a YAML file holding it
            data[section] = read_yaml(data[section])
    data = _apply_seed(data)
    for item in overrides:
        update = parse_overrides([item])
        data = _apply_seed(merge(data, update)) if "seed" in update else merge(data, update)
    run = data.get("output_dir", "runs/experiment")
    if not isinstance(run, str) or not run:
        raise ConfigError(f"config key 'output_dir' expects a folder path, got {run!r}" + (f" (in {path})" if path else ""))
    run = Path(run)
    for section, keys in wired_paths(run).items():
        given = data.get(section) or {}
        for key in keys:
            if key in given and str(given[key]) != keys[key]:  # a run's saved experiment.yaml names its own
                raise ConfigError(
                    f"{section}.{key} is set by the experiment runner (inside output_dir={run}); remove it"
                    + (f" from {path}" if path else "")
                )
        data[section] = merge(given, keys)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{err}" + (f" (in {path})" if path else "")) from None


def _existing_record(run: Path, s: Stage) -> dict | None:
    """The record a stage folder holds (a folder that produced nothing has none to keep), or one rebuilt from its
    files when it was written before records."""
    if not s.produced(run):
        return None
    record = read_record(run / s.record_path)
    if record is None and s.name != "evaluate":
        record = legacy_record(s.name, run / s.outputs[0])
    return record


def _ways_out(run: Path, name: str) -> str:
    return (f"rerun with --force {name} to redo {name} from scratch (every later stage is redone too), or give "
            f"another output_dir to keep {run} as it is")


def _config_changes(cfg, run: Path, s: Stage) -> tuple[list[str], list[str]]:
    """(changes the stage continues over, every other change) between its record and the config."""
    old = _existing_record(run, s)
    if old is None:
        return [], []
    new = {"stage": s.name, "config": to_dict(getattr(cfg, s.name)), "inputs": None}
    found = record_changes({**old, "inputs": None}, new, s.config_cls, s.ignored)
    return split_changes(found, CONTINUABLE) if s.trainer else ([], found)


def check_stage_configs(cfg, run: Path, first_forced: int = len(STAGES)) -> None:
    """Refuse, in one message, when stages before ``first_forced`` hold results of other settings.

    Compares every stage's record with the config (not only the stages to run: a later run must not find
    results of two configs in one folder). A trainer may continue over ``train.steps``, ``train.batch_size``
    and ``train.grad_accum``. Inputs are compared later, stage by stage (``check_stage_inputs``).
    """
    problems, first = [], None
    for s in STAGES[:first_forced]:
        _, refused = _config_changes(cfg, run, s)
        if refused:
            problems.append(f"{s.name}: {', '.join(refused)}")
            first = first or s.name
    if problems:
        raise StaleStageError(f"{run} holds results made with other settings ({'; '.join(problems)}); "
                              + _ways_out(run, first))


def check_stage_inputs(cfg, run: Path, s: Stage, redo_if_changed: bool = False) -> tuple[dict, bool]:
    """The record ``s`` would get now, and whether its output must be redone because its inputs changed.

    Inputs that changed because an earlier stage was computed in this run (``redo_if_changed``) mean the stage is
    redone; otherwise changed inputs are refused (``StaleStageError``).
    """
    new = s.record(getattr(cfg, s.name), run)
    old = _existing_record(run, s)
    if old is None:
        return new, False
    found = record_changes(old, new, s.config_cls, s.ignored)
    if s.trainer:
        found = split_changes(found, CONTINUABLE)[1]
    if not found:
        return new, False
    if redo_if_changed and all(c.startswith("input ") for c in found):
        return new, True
    raise StaleStageError(f"{run}: stage {s.name} was made from other inputs or settings ({'; '.join(found)}); "
                          + _ways_out(run, s.name))


def _entries(run: Path, stages: Sequence[Stage]) -> list[str]:
    """The entries of the run folder the stages wrote (an interrupted sampling's folder too), each checked to be
    removable (``vqgen.core.files.check_removable_entry``: only what vqgen wrote for this run)."""
    names = [name for s in stages for name in s.outputs]
    if any(s.name == "sample" for s in stages):
        names.append(partial_path(run / "samples").name)
    names = [n for n in names if (run / n).exists() or (run / n).is_symlink()]
    for name in names:
        check_removable_entry(run, name)
    return names


def forced_outputs(run: Path, force: Sequence[str]) -> list[str]:
    """The entries ``--force`` deletes (the earliest forced stage's and every later one's), checked first."""
    first = min((STAGE_NAMES.index(name) for name in force), default=len(STAGES))
    return _entries(run, STAGES[first:])


def remove_outputs(run: Path, s: Stage) -> list[str]:
    """Delete what ``s`` wrote inside the run folder (every entry checked before the first goes)."""
    return remove_owned(run, _entries(run, [s]))


def force_stages(run: Path, force: Sequence[str]) -> int:
    """Delete the outputs of the earliest forced stage and of every stage after it; returns its index.

    Every entry is checked before the first one is deleted; nothing but what vqgen wrote for this run is.
    """
    first = min((STAGE_NAMES.index(name) for name in force), default=len(STAGES))
    removed = remove_owned(run, forced_outputs(run, force))
    if removed:
        print(f"[run] --force {STAGE_NAMES[first]}: removed {', '.join(removed)}")
    return first


def write_stage_record(run: Path, s: Stage, record: dict, ran: bool) -> None:
    """The record of what ``s``'s folder holds now. A trainer that ran wrote its own (with its provenance and
    how the run was continued); a stage computed now gets this process's provenance; a reused stage keeps the
    provenance it was made with (a folder from before provenance was recorded gets none)."""
    path = run / s.record_path
    if ran and s.trainer:  # the trainer wrote its record; the outputs listed last make it complete
        record_outputs(path, s.folder(run), s.result_files)
        return
    old = read_record(path) or {}
    if ran:
        record = with_provenance(record)
    else:
        record = {**record, **{k: old[k] for k in ("provenance", "provenance_history", "continued") if k in old}}
    if s.result_files:  # written last: the stage is complete (pipelines.completion)
        record["outputs"] = {name: (s.folder(run) / name).stat().st_size for name in s.result_files}
    write_record(path, record)


def needed_splits(cfg) -> dict[str, list[str]]:
    """split -> the settings of the stages in ``cfg.stages`` that read it (all from ``tokenizer.data``)."""
    needs: dict[str, list[str]] = {}
    stages = set(cfg.stages)
    if "tokenizer" in stages:
        needs.setdefault("train", []).append("tokenizer")
        needs.setdefault("validation", []).append("tokenizer")
    if "encode" in stages:
        for split in cfg.encode.splits:
            needs.setdefault(split, []).append("encode.splits")
    if "evaluate" in stages:
        needs.setdefault(cfg.evaluate.split, []).append(f"evaluate.split={cfg.evaluate.split}")
    return needs


def check_splits(cfg) -> None:
    """Refuse, before any stage runs, when the data lacks a split a stage of this run will read; the one line
    names the split, who needs it, how to add it to the data and how to run without it."""
    needs = needed_splits(cfg)
    missing = missing_splits(cfg.tokenizer.data, needs)
    if not missing:
        return
    split, reason = next(iter(missing.items()))
    ways = []
    if any(who.startswith("encode") for who in needs[split]):
        ways.append(f"encode.splits={json.dumps([s for s in cfg.encode.splits if s != split])}")
    if any(who.startswith("evaluate") for who in needs[split]):
        ways.append("evaluate.split=" + next(s for s in ("validation", "train") if s not in missing))
    without = f", or run without it: {' '.join(ways)}" if ways and "tokenizer" not in needs[split] else ""
    raise DataError(f"this run needs the {split} split ({', '.join(needs[split])}) and the data cannot give it: "
                    f"{reason}{without}")


@owns_folder(lambda cfg, *args, **kwargs: cfg.output_dir, "run", what="output_dir")
def run_experiment(cfg, force: Sequence[str] = ()) -> dict:
    """Run the configured stages into ``cfg.output_dir``; returns the evaluation report (or {}).

    Before anything runs, every stage already in the folder is compared with ``cfg`` (``StaleStageError``
    names the changed keys) and the data is checked for every split the stages will read (``check_splits``).
    ``force`` lists stages to redo from scratch: their outputs and those of every
    later stage are deleted first. A trainer whose ``train.steps``, batch size or accumulation changed continues
    from its newest checkpoint, and every later stage that used its result is redone.
    """
    unknown = [name for name in force if name not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--force takes stages among {', '.join(STAGE_NAMES)}, got {unknown[0]!r}")
    run = check_output_dir(cfg.output_dir, "output_dir")
    first_forced = min((STAGE_NAMES.index(name) for name in force), default=len(STAGES))
    check_stage_configs(cfg, run, first_forced)
    check_splits(cfg)
    force_stages(run, force)
    save_experiment(cfg, run / "experiment.yaml")
    report: dict = {}
    seconds: dict[str, float] = {}
    upstream_ran = False  # an earlier stage computed its output in this run: later inputs may have changed
    for name in cfg.stages:
        s = stage(name)
        section = getattr(cfg, name)
        started = time.perf_counter()
        record, redo = check_stage_inputs(cfg, run, s, redo_if_changed=upstream_ran)
        if redo:
            removed = remove_outputs(run, s)
            print(f"[run] {name}: redone, its inputs changed ({', '.join(removed)} removed)")
        continuing = s.trainer and bool(_config_changes(cfg, run, s)[0])
        if s.complete(section, run) and not continuing:
            print(f"[run] {name}: complete, skipped")
            ran = False
            if name == "evaluate":
                report = load_json(run / "report.json")
        else:
            print(f"[run] {name}" + (": continuing" if continuing else ": training" if s.trainer else ""))
            if not s.trainer:  # its record is written again, last, after its outputs
                (run / s.record_path).unlink(missing_ok=True)
            result = s.run(section, run)
            if name == "evaluate":
                report = result
            ran = True
        write_stage_record(run, s, record, ran)
        upstream_ran = upstream_ran or ran
        seconds[name] = time.perf_counter() - started
    if seconds:
        total = sum(seconds.values())
        print("[run] wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + f"; total {total:.0f} s ({total / 60:.1f} min) on {machine_summary()}")
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


SWEEP_KEYS = ("compare_dir", "experiments", "overrides", "seeds")
ENTRY_KEYS = ("config", "name", "overrides")


@dataclass(frozen=True)
class SweepRun:
    """One experiment of a sweep: its experiment file and every override on top of it, lowest precedence first.

    ``load()`` gives its ``ExperimentConfig``; ``source`` says where in which file it came from.
    """

    name: str
    config: str
    overrides: tuple[str, ...]
    output_dir: str
    source: str

    def load(self) -> ExperimentConfig:
        return load_experiment(self.config, self.overrides)


def expand_sweep(path: str | Path, cli_overrides: Sequence[str] = ()) -> tuple[list[SweepRun], str | None]:
    """The experiments a ``--config`` file stands for, and its comparison folder (None if it names none).

    A file without any of the sweep keys (``experiments``, ``seeds``, ``overrides``, ``compare_dir``) is one
    experiment. A sweep file is a mapping::

        seeds: [0, 1, 2]                          # optional: every entry runs once per seed
        overrides: [tokenizer.train.steps=2000]   # optional: applied to every entry
        compare_dir: runs/ladder                  # optional: where the comparison report goes
        experiments:
          - configs/experiments/mnist_fixed.yaml            # an experiment file as it is
          - config: configs/experiments/mnist_fixed.yaml    # or a mapping (config required)
            name: mnist_fixed_4096x16                       # run name; folder <dirname of output_dir>/<name>
            overrides: [tokenizer.model.quantizer.codebook_size=4096, tokenizer.model.quantizer.dim=16]

    With ``seeds`` each entry becomes one experiment per seed ``s``: ``seed=s`` (see ``ExperimentConfig``),
    name ``<name>_s<s>``, folder ``<output_dir>_s<s>``.

    Precedence, later wins: the experiment file < the sweep's ``overrides`` < the entry's ``overrides`` (then its
    ``name``) < the seed < ``cli_overrides`` (those given to ``vqgen run``). Unknown keys in the sweep file or an
    entry, overrides of unknown config keys and two experiments writing the same folder raise ``ConfigError``.
    Reads files only: nothing is run or written. Experiment paths are relative to the working directory.
    """
    data = read_yaml(path)
    cli = [str(o) for o in cli_overrides]
    if not set(data) & set(SWEEP_KEYS):
        return [_sweep_run(str(path), cli, str(path))], None
    where = f"sweep file {path}"
    _reject_unknown(data, SWEEP_KEYS, where)
    entries = data.get("experiments")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'experiments' must be a non-empty list of experiment files or of mappings "
                          f"with keys {', '.join(ENTRY_KEYS)}")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    compare_dir = data.get("compare_dir")
    if compare_dir is not None and not isinstance(compare_dir, str):
        raise ConfigError(f"{where}: 'compare_dir' must be a folder path, got {compare_dir!r}")
    common = _override_list(data.get("overrides"), f"{where}: 'overrides'")
    runs = []
    for i, entry in enumerate(entries):
        at = f"{where}, experiments[{i}]"
        if isinstance(entry, str):
            entry = {"config": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be an experiment file or a mapping with keys {', '.join(ENTRY_KEYS)}, "
                              f"got {entry!r}")
        _reject_unknown(entry, ENTRY_KEYS, at)
        config = entry.get("config")
        if not isinstance(config, str) or not config:
            raise ConfigError(f"{at}: 'config' (the experiment file) is required, got {config!r}")
        overrides = common + _override_list(entry.get("overrides"), f"{at}: 'overrides'")
        name, run_dir = entry.get("name"), _peek(config, overrides, "output_dir", at)
        if name is not None:
            check_run_name(name, at)
            run_dir = str(Path(run_dir).parent / name)
            check_inside(run_dir, Path(run_dir).parent, f"{at}: the run folder")
        else:
            name = _peek(config, overrides, "name", at)
        for seed in seeds or [None]:
            named = [] if seed is None else [f"seed={seed}"]
            if entry.get("name") is not None or seed is not None:
                suffix = "" if seed is None else f"_s{seed}"
                named += [f"name={json.dumps(name + suffix)}", f"output_dir={json.dumps(run_dir + suffix)}"]
            runs.append(_sweep_run(config, overrides + named + cli, at + ("" if seed is None else f", seed {seed}")))
    reject_shared_folders(runs)
    return runs, compare_dir


def _sweep_run(config: str, overrides: list[str], source: str) -> SweepRun:
    """Load the experiment once (validating every override) and record where it writes."""
    try:
        cfg = load_experiment(config, overrides)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source != config else str(err)) from None
    return SweepRun(cfg.name, config, tuple(overrides), cfg.output_dir, source)


def _peek(config: str, overrides: list[str], key: str, where: str) -> str:
    """A top-level key of an experiment after ``overrides``, without validating the rest (yet)."""
    try:
        data = merge(read_yaml(config), parse_overrides(overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    value = data.get(key, getattr(ExperimentConfig(), key))
    if not isinstance(value, str):
        raise ConfigError(f"{where}: config key '{key}' of {config} expects a string, got {value!r}")
    return value


def _reject_unknown(data: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(allowed)}")


def _override_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    return list(value)


def reject_shared_folders(runs: Sequence[SweepRun]) -> None:
    """Raise ``ConfigError`` when two runs would write the same output folder."""
    seen: dict[str, SweepRun] = {}
    for run in runs:
        key = os.path.normcase(os.path.abspath(run.output_dir))
        if key in seen:
            raise ConfigError(
                f"{seen[key].source} and {run.source} would both write {run.output_dir}; give the entries "
                "different names (name: ...) or output_dir overrides"
            )
        seen[key] = run


@entry_point
def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Run experiments end to end (resumable stage by stage).")
    parser.add_argument("--config", action="append", required=True,
                        help="experiment or sweep YAML; repeat to run several and compare them")
    parser.add_argument("--compare-dir", default=None, help="where the comparison report goes (several configs)")
    parser.add_argument("--force", default="", metavar="STAGE[,STAGE]",
                        help=f"redo these stages (among {', '.join(STAGE_NAMES)}) and every later one from scratch; "
                             "their outputs are deleted first")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides applied to every experiment (they win over a sweep's)")
    args = parser.parse_intermixed_args(argv)
    force = [s.strip() for s in args.force.split(",") if s.strip()]
    if any(s not in STAGE_NAMES for s in force):
        raise ConfigError(f"--force takes stages among {', '.join(STAGE_NAMES)}, got {args.force!r}")
    runs, compare_dir = [], None
    for path in args.config:
        found, sweep_compare_dir = expand_sweep(path, args.overrides)
        runs += found
        compare_dir = sweep_compare_dir or compare_dir
    reject_shared_folders(runs)
    configs = [run.load() for run in runs]
    for cfg in configs:  # every experiment's folders before the first one starts (and before anything is deleted)
        check_writable_as(cfg.output_dir, "run", "output_dir")
        run_dir = check_output_dir(cfg.output_dir, "output_dir")
        check_stage_configs(cfg, run_dir, min((STAGE_NAMES.index(s) for s in force), default=len(STAGES)))
        check_splits(cfg)
        forced_outputs(run_dir, force)
    compare_out = Path(args.compare_dir or compare_dir or "runs/comparison")
    if len(configs) > 1:
        check_writable_as(compare_out, "report", "the comparison folder")
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
        compare_runs([c.output_dir for c in configs], compare_out)
        print(f"\ncomparison: {compare_out}")
    return reports


if __name__ == "__main__":
    main()
