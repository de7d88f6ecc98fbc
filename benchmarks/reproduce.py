"""Run the papers' studies with several seeds, then write results.json / results.md with a verdict per claim.

Two studies, each defined by one sweep file per data set (arms x seeds, the full-size settings a GPU user runs
unchanged with ``vqgen run --config ...``):

- ``adaptive`` (``configs/experiments/study_adaptive_<dataset>.yaml``): fixed EMA rungs ``fixed_<N>x<D>`` of
  the W = 65536 ladder, ``adaptive_faithful`` (the authors' selector) and ``adaptive_working`` (a selector
  that learns), every arm started the same way (a short continuous warm-up, then k-means).
- ``deferred`` (``configs/experiments/study_deferred_<dataset>.yaml``): ``early_random``, ``early_kmeans``
  (the authors' baseline), ``early_deadcode``, ``deferred``, ``deferred_soft``, same total steps; for
  ``--generation-arms`` x ``--generation-seeds`` also a prior (early stopping on validation NLL), samples
  and generation metrics in two feature spaces.

This script shrinks the runs to a CPU budget (``--tokenizer-steps`` and the preset below; every step-valued
setting scales with the steps), runs them ``--jobs`` at a time (one thread each; resumable: finished stages
are skipped, interrupted ones resume), measures every tokenizer on the whole test split
(``RUN/study_metrics.json``), and rebuilds the results from every finished run::

    python benchmarks/reproduce.py --study adaptive --dataset mnist --jobs 2
    python benchmarks/reproduce.py --study deferred --dataset cifar10 --jobs 2
    python benchmarks/reproduce.py --report-only          # tables, plots and verdicts from finished runs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vqgen.eval.studies import (combine_verdicts, compare_arms, default_margin, fragile, holm,  # noqa: E402
                                summarize, verdict)
from vqgen.core.io import load_json, save_json  # noqa: E402

STUDIES = ("adaptive", "deferred", "quantizers")
DATASETS = ("mnist", "cifar10")
GENERATION_STAGES = "stages=[tokenizer,encode,prior,sample,evaluate]"


# ----------------------------------------------------------------------------------------------- budget
def budget_overrides(args) -> list[str]:
    """The CPU budget, the same for every arm of a study (stated next to every table)."""
    t = args.tokenizer_steps
    return [
        f"tokenizer.train.steps={t}", f"tokenizer.train.batch_size={args.batch_size}",
        f"tokenizer.model.hidden={args.hidden}", f"tokenizer.data.max_samples={args.max_samples}",
        f"tokenizer.train.lr={args.lr}", f"tokenizer.train.log_every={max(1, t // 100)}",
        f"tokenizer.train.checkpoint_every={max(1, t // 4)}", "tokenizer.train.trackers=[]",
    ]


def generation_overrides(args) -> list[str]:
    """Prior / sampling / evaluation budget of the generation runs."""
    p = args.prior_steps
    return [
        GENERATION_STAGES,
        "prior.model.n_layer=4", "prior.model.n_head=4", "prior.model.n_embd=128", "prior.model.dropout=0.1",
        f"prior.train.steps={p}", f"prior.train.batch_size={args.prior_batch_size}", f"prior.train.lr={args.prior_lr}",
        f"prior.train.warmup_steps={max(1, p // 40)}", "prior.train.lr_schedule=cosine",
        f"prior.train.log_every={max(1, args.prior_eval_every // 5)}",
        f"prior.train.eval_every={args.prior_eval_every}", f"prior.train.checkpoint_every={args.prior_eval_every}",
        f"prior.train.early_stopping_patience={args.prior_patience}", "prior.train.trackers=[]",
        f"sample.num_samples={args.num_images}", f"evaluate.num_images={args.num_images}",
    ]


STEP_FIELDS = ("tokenizer.schedule.ae_steps", "tokenizer.schedule.transition_steps",
               "tokenizer.model.quantizer.selector_tau_steps", "tokenizer.model.quantizer.tau_anneal_steps")


def scaled_overrides(cfg, steps: int) -> list[str]:
    """Step-valued settings scaled from the experiment's own ``train.steps`` to ``steps`` (e.g. the authors'
    tau schedule over 20k steps becomes the same schedule over the shorter run). Only settings in use are
    touched: schedule lengths that are set, and quantizer fields the arm's kind reads."""
    from vqgen.tokenizer.quantizers.registry import spec_of

    ratio = steps / cfg.tokenizer.train.steps
    quantizer_fields = spec_of(cfg.tokenizer.model.quantizer.kind).fields
    out = []
    for key in STEP_FIELDS:
        *path, name = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        if path[-1] == "quantizer" and name not in quantizer_fields:
            continue
        value = getattr(obj, name)
        if value:
            out.append(f"{key}={max(1, round(value * ratio))}")
    return out


def study_runs(args, study: str, dataset: str) -> list[dict]:
    """Every run of one study on one data set: name, arm, seed, the experiment file and its overrides."""
    from vqgen.pipelines.run import expand_sweep, load_experiment

    sweep = REPO / "configs" / "experiments" / f"study_{study}_{dataset}.yaml"
    expanded, _ = expand_sweep(sweep)
    runs = []
    for r in expanded:
        m = re.fullmatch(r"(.+)_s(\d+)", r.name)
        arm, seed = (m.group(1), int(m.group(2))) if m else (r.name, 0)
        if args.seeds and seed not in args.seeds:
            continue
        full = load_experiment(r.config, r.overrides)
        folder = Path(args.runs) / f"{study}_{dataset}" / r.name
        overrides = list(r.overrides) + budget_overrides(args) + scaled_overrides(full, args.tokenizer_steps)
        overrides.append(f"output_dir={folder}")
        generation = (study == "deferred" and arm in args.generation_arms
                      and (not args.generation_seeds or seed in args.generation_seeds))
        if generation:
            overrides += generation_overrides(args)
        overrides += args.override
        runs.append({"name": r.name, "arm": arm, "seed": seed, "config": r.config, "overrides": overrides,
                     "dir": str(folder), "oracle": arm.startswith("adaptive"), "generation": generation})
    return runs


# ----------------------------------------------------------------------------------------------- one run
def study_metrics(run_dir: Path, oracle: bool, batch_size: int = 250) -> dict:
    """Codebook metrics of the run's tokenizer on the whole test split (cached with its fingerprint)."""
    from vqgen.eval.codebook import codebook_metrics
    from vqgen.core.config import from_dict, read_yaml
    from vqgen.tokenizer.data import DataConfig, build_dataset, make_dataloader
    from vqgen.tokenizer.model import VQVAE, tokenizer_fingerprint

    tok = run_dir / "tokenizer"
    path = run_dir / "study_metrics.json"
    fingerprint = tokenizer_fingerprint(tok / "model")
    if path.is_file() and load_json(path).get("fingerprint") == fingerprint:
        return load_json(path)["metrics"]
    model = VQVAE.from_pretrained(tok / "model")
    data_cfg = from_dict(DataConfig, read_yaml(tok / "config.yaml")["data"], prefix="data.")
    loader = make_dataloader(build_dataset(data_cfg, "test"), batch_size=batch_size, shuffle=False)
    t0 = time.perf_counter()
    metrics = codebook_metrics(model, (b["image"] for b in loader), oracle=oracle)
    save_json({"fingerprint": fingerprint, "split": "test", "seconds": time.perf_counter() - t0,
               "metrics": metrics}, path)
    return metrics


def run_one(spec: dict) -> tuple[str, str | None]:
    """Worker: train (or resume) one run's stages, then its test-split metrics. Returns (name, error)."""
    torch.set_num_threads(1)
    os.environ.setdefault("VQGEN_NO_PROGRESS", "1")
    try:
        from vqgen.pipelines.run import load_experiment, run_experiment

        cfg = load_experiment(spec["config"], spec["overrides"])
        t0 = time.perf_counter()
        run_experiment(cfg)
        clock = Path(spec["dir"]) / "study_seconds.json"
        before = load_json(clock) if clock.is_file() else {}
        where = list(dict.fromkeys(before.get("hardware", []) + [hardware()]))  # every machine that worked on it
        save_json({"seconds": before.get("seconds", 0.0) + time.perf_counter() - t0, "hardware": where}, clock)
        study_metrics(Path(spec["dir"]), spec["oracle"])
        return spec["name"], None
    except Exception:  # one failed run must not stop the others; it is reported at the end
        return spec["name"], traceback.format_exc()


def prepare_feature_spaces(spec: dict) -> None:
    """Train and cache the evaluation feature extractors once, before parallel runs could race for them."""
    from vqgen.eval.fid import load_feature_space
    from vqgen.pipelines.run import load_experiment

    cfg = load_experiment(spec["config"], spec["overrides"])
    ev = cfg.evaluate
    for name in ev.feature_spaces():
        load_feature_space(name, data_cfg=cfg.tokenizer.data, classifier=ev.classifier, contrastive=ev.contrastive)


def execute(runs: list[dict], jobs: int) -> None:
    """Run everything ``jobs`` at a time, longest first; report failures at the end."""
    todo = sorted(runs, key=lambda r: (not r["generation"], not r["oracle"]))
    gen = [r for r in todo if r["generation"]]
    if gen:
        prepare_feature_spaces(gen[0])
    failures = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs, maxtasksperchild=1) as pool:
        for name, error in pool.imap_unordered(run_one, todo):
            print(f"[reproduce] {name}: {'failed' if error else 'done'}", flush=True)
            if error:
                failures.append((name, error))
    for name, error in failures:
        print(f"[reproduce] {name} failed:\n{error}", file=sys.stderr)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed; rerun the same command to retry them")


# ----------------------------------------------------------------------------------------------- collect
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def ladder_of(run_dir: Path) -> list[tuple[int, int]]:
    """(N, D) of each codebook of the run's tokenizer."""
    from vqgen.core.config import read_yaml

    q = read_yaml(run_dir / "tokenizer" / "config.yaml")["model"]["quantizer"]
    if q["kind"] == "adaptive":
        return [(q["capacity"] // d, d) for d in q["ladder_dims"]]
    return [(q["codebook_size"], q["dim"])]


def dynamics(run_dir: Path) -> dict:
    """Selector behaviour over training from ``metrics.jsonl`` (quantized phase only).

    ``early_large_n_share``: share of units given to the larger-N half of the ladder over the first 20% of
    the logged quantized steps; ``selection_entropy_early`` / ``_late``: entropy (nats) of the mean selection
    over the first / last 20%; ``selector_grad_rms_median``: median logged gradient RMS per selector parameter (vs Adam's eps 1e-8).
    """
    rows = [r for r in read_jsonl(run_dir / "tokenizer" / "metrics.jsonl") if r.get("selection")]
    if len(rows) < 5:
        return {}
    ladder = ladder_of(run_dir)
    order = sorted(range(len(ladder)), key=lambda i: ladder[i][0])
    large = order[len(order) // 2:]
    fifth = max(1, len(rows) // 5)

    def mean_selection(part):
        sel = torch.tensor([r["selection"] for r in part], dtype=torch.float64).mean(0)
        return sel / sel.sum()

    def entropy(p):
        return float(-torch.special.xlogy(p, p).sum())

    early, late = mean_selection(rows[:fifth]), mean_selection(rows[-fifth:])
    grads = sorted(r["selector_grad_rms"] for r in rows if r.get("selector_grad_rms") is not None)
    out = {"early_large_n_share": float(early[large].sum()), "selection_entropy_early": entropy(early),
           "selection_entropy_late": entropy(late)}
    if grads:
        out["selector_grad_rms_median"] = grads[len(grads) // 2]
    return out


def run_record(spec: dict) -> dict | None:
    """Every number of one finished run, flat (None when its tokenizer has not finished)."""
    run = Path(spec["dir"])
    path = run / "study_metrics.json"
    if not path.is_file():
        return None
    m = load_json(path)["metrics"]
    rec = {k: m.get(k) for k in ("recon_mse", "psnr", "perplexity", "usage", "live_code_distance",
                                 "live_code_distance_ratio", "code_distance")}
    summary = load_json(run / "tokenizer" / "summary.json")
    rec["images_per_second"] = summary.get("images_per_second")
    ladder = ladder_of(run)
    if len(ladder) > 1:
        rec["selection_entropy"] = m["selection_entropy"]
        for (n, d), sel, use, bm in zip(ladder, m["selection"], m["usage_per_codebook"], m.get("branch_mse", [])):
            rec[f"selection_{n}x{d}"] = sel
            rec[f"usage_{n}x{d}"] = use
            rec[f"branch_mse_{n}x{d}"] = bm
        if "oracle_mse" in m:
            rec["oracle_mse"] = m["oracle_mse"]
        rec.update(dynamics(run))
    final_tau = final_temperature(run)
    if final_tau:
        rec.update(final_tau)
    report = run / "report.json"
    if spec["generation"] and report.is_file():
        r = load_json(report)
        gen = r.get("generation", {})
        rec.update(gfid=gen.get("fid"), recall=gen.get("recall"), coverage=gen.get("coverage"),
                   precision=gen.get("precision"), mode_coverage=gen.get("mode_coverage"),
                   token_perplexity=gen.get("token_perplexity"))
        for name, space in (r.get("feature_spaces") or {}).items():
            if space.get("feature_extractor", {}).get("label_free") and space.get("generation"):
                g = space["generation"]
                rec.update(gfid_label_free=g.get("fid"), recall_label_free=g.get("recall"),
                           coverage_label_free=g.get("coverage"), label_free_space=name,
                           label_free_knn_accuracy=space["feature_extractor"].get("knn_accuracy"))
        prior = load_json(run / "prior" / "summary.json") if (run / "prior" / "summary.json").is_file() else {}
        rec.update(prior_val_nll=prior.get("val_nll"), prior_best_step=prior.get("best_step"))
    return {k: v for k, v in rec.items() if v is not None}


def final_temperature(run_dir: Path) -> dict:
    """``tau_last_step`` (the temperature of the last training step, from ``metrics.jsonl``) and ``tau_end`` (what
    the configured schedule reaches after the quantized phase) of a run whose quantizer anneals one."""
    from vqgen.core.config import read_yaml

    rows = [r for r in read_jsonl(run_dir / "tokenizer" / "metrics.jsonl") if r.get("tau") is not None]
    if not rows:
        return {}
    cfg = read_yaml(run_dir / "tokenizer" / "config.yaml")
    q, train, schedule = cfg["model"]["quantizer"], cfg["train"], cfg.get("schedule", {})
    quantized = train["steps"] - (schedule.get("ae_steps", 0) if schedule.get("mode") == "deferred" else 0)
    out = {"tau_last_step": rows[-1]["tau"], "tau_last_logged_step": rows[-1]["step"]}
    if "selector_tau_steps" in q:
        frac = min(quantized / q["selector_tau_steps"], 1.0)
        out["tau_end"] = q["selector_tau_start"] + (q["selector_tau_end"] - q["selector_tau_start"]) * frac
    return out


STAGE_FOLDERS = {"tokenizer": "tokenizer/vqgen_stage.json", "tokens": "tokens/vqgen_stage.json",
                 "prior": "prior/vqgen_stage.json", "samples": "samples/vqgen_stage.json", "report": "report_stage.json"}


def run_provenance(run_dir: Path) -> dict:
    """Per stage of a run, the code that made it (commit, dirty flag, code fingerprint) and, once, the package
    versions and machine of its tokenizer; stages continued under other code list that code too."""
    out: dict = {}
    for stage, rel in STAGE_FOLDERS.items():
        path = run_dir / rel
        if not path.is_file():
            continue
        record = load_json(path)
        p = record.get("provenance")
        if p is None:
            out[stage] = None
            continue
        out[stage] = {k: p.get(k) for k in ("commit", "dirty", "code_sha256")}
        if record.get("provenance_history"):
            out[stage]["earlier"] = [{k: h.get(k) for k in ("commit", "dirty", "code_sha256")}
                                     for h in record["provenance_history"]]
        out.setdefault("versions", p.get("versions"))
        out.setdefault("machine", p.get("machine"))
    return out


def commits_of(provenance: dict) -> set[str]:
    """Every code version a run's stages name (``<commit>``, ``<commit>+dirty``, ``unrecorded``)."""
    found = set()
    for stage in STAGE_FOLDERS:
        if stage not in provenance:
            continue
        p = provenance[stage]
        for entry in ([p] + (p.get("earlier") or [])) if p else [None]:
            if entry is None or not entry.get("commit"):
                found.add("unrecorded" if entry is None else f"code {entry.get('code_sha256', '')[:12]}")
            else:
                found.add(entry["commit"][:12] + ("+dirty" if entry.get("dirty") else ""))
    return found


# What a later commit may change and still count as the code of an earlier one for a study: the study sweeps (each
# run records its own experiment file and settings), tests and prose. Anything else is a new version.
CODE_NEUTRAL = re.compile(r"configs/experiments/study_[^/]+\.yaml|tests/.+|docs/.+|[^/]+\.md")


def same_code_commits(commits: list[str], root: Path = REPO) -> str | None:
    """The newest of several clean commits when git shows they differ in study sweeps, tests and prose only, else None.

    Lets a study add seeds to its sweep (a new commit on top of the pinned one) without mixing code: the newest
    commit must contain every other, and ``git diff --name-only`` between them may name only ``CODE_NEUTRAL``
    paths. Any failure (a commit this checkout lacks, no git) answers None: the runs then count as mixed.
    """
    if len(commits) < 2 or not all(re.fullmatch(r"[0-9a-f]{7,40}", c) for c in commits):
        return None

    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=60)

    try:
        newest = [c for c in commits
                  if all(git("merge-base", "--is-ancestor", o, c).returncode == 0 for o in commits if o != c)]
        if not newest:
            return None
        for other in commits:
            diff = git("diff", "--name-only", other, newest[0])
            if diff.returncode != 0 or not all(CODE_NEUTRAL.fullmatch(f) for f in diff.stdout.split()):
                return None
    except (OSError, subprocess.SubprocessError):
        return None
    return newest[0]


def collect(args, study: str, dataset: str) -> dict | None:
    """One study on one data set: arms with per-metric mean / std / values (only finished runs count)."""
    runs = study_runs(args, study, dataset)
    by_arm: dict[str, list[tuple[int, dict]]] = {}
    provenance: dict[str, dict] = {}
    for spec in runs:
        rec = run_record(spec)
        if rec is not None:
            by_arm.setdefault(spec["arm"], []).append((spec["seed"], rec))
            provenance[spec["name"]] = run_provenance(Path(spec["dir"]))
    if not by_arm:
        return None
    commits = sorted(set().union(*(commits_of(p) for p in provenance.values())))
    mixed = len(commits) != 1 or commits[0].endswith("+dirty") or commits[0] == "unrecorded" or " " in commits[0]
    code_commit = commits[0] if not mixed else same_code_commits(commits)
    mixed = code_commit is None
    if mixed and not args.allow_mixed_commits:
        raise SystemExit(
            f"{study} on {dataset}: the runs were made by more than one version of the code, or by uncommitted or "
            f"unrecorded code ({', '.join(commits)}); rerun them from one commit (a worktree pinned at it), or pass "
            "--allow-mixed-commits to build the table anyway (it then says so)")
    arms = []
    for arm in dict.fromkeys(spec["arm"] for spec in runs):
        records = sorted(by_arm.get(arm, []), key=lambda x: x[0])
        if not records:
            continue
        names = dict.fromkeys(k for _, rec in records for k in rec if isinstance(rec[k], (int, float)))
        metrics = {}
        for name in names:
            values = [(s, rec[name]) for s, rec in records if isinstance(rec.get(name), (int, float))]
            metrics[name] = {**summarize([v for _, v in values]), "seeds": [s for s, _ in values]}
        arms.append({"arm": arm, "metrics": metrics})
    clocks = [load_json(Path(s["dir"]) / "study_seconds.json") for s in runs
              if (Path(s["dir"]) / "study_seconds.json").is_file()]
    minutes = sum(c["seconds"] for c in clocks) / 60
    # where the runs ran, as each recorded it (runs from before that record had only this machine)
    machines = list(dict.fromkeys(h for c in clocks for h in c.get("hardware", [])))
    command = study_command(args, study, dataset)
    if not mixed:  # the code that made every run: check it out (a worktree keeps yours as it is), then run
        command = f"git worktree add ../vqgen-{code_commit[:7]} {code_commit} && cd ../vqgen-{code_commit[:7]} && {command}"
    if study == "deferred" and args.generation_arms and not any("gfid" in a["metrics"] for a in arms):
        command += " --generation-arms ''"  # what ran: no generation on this data set
    return {
        "study": study, "dataset": dataset,
        "command": command,
        "commits": commits,
        "mixed_commits": mixed,
        "code_commit": code_commit,
        "provenance": provenance,
        "hardware": " | ".join(machines) if machines else hardware(),
        "budget": {"tokenizer_steps": args.tokenizer_steps, "batch_size": args.batch_size, "hidden": args.hidden,
                   "lr": args.lr, "max_train_images": args.max_samples, "prior_max_steps": args.prior_steps,
                   "prior_eval_every": args.prior_eval_every, "prior_patience": args.prior_patience,
                   "num_generated_images": args.num_images, "split": "test", "overrides": args.override,
                   "run_minutes_single_thread": round(minutes, 1)},
        "arms": arms,
    }


def hardware() -> str:
    from vqgen.core.provenance import machine_summary

    device = machine_summary() if torch.cuda.is_available() else f"{machine_summary()}, no GPU"
    return f"{device}; torch {torch.__version__}; runs single-threaded, {os.cpu_count()} at a time at most"


# ----------------------------------------------------------------------------------------------- claims
FRACTIONS = {"usage", "recall", "coverage", "recall_label_free", "coverage_label_free", "early_large_n_share"}


def _arm(study: dict, name: str) -> dict | None:
    return next((a for a in study["arms"] if a["arm"] == name), None)


def _values(study: dict, arm: str, metric: str) -> list[float] | None:
    a = _arm(study, arm)
    return a["metrics"][metric]["values"] if a and metric in a["metrics"] else None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _mstd(values: list[float]) -> str:
    s = summarize(values)
    return f"{_fmt(s['mean'])} +- {_fmt(s['std'])} (n={len(values)})"


def _test(study, claimed_arm, base_arm, metric, lower_is_better, claimed=None, baseline=None) -> dict | None:
    """One comparison (raw p; the verdict and text are set once the family's p values are adjusted)."""
    a = claimed if claimed is not None else _values(study, claimed_arm, metric)
    b = baseline if baseline is not None else _values(study, base_arm, metric)
    if not a or not b:
        return None
    result = compare_arms(a, b, lower_is_better, default_margin(b, metric in FRACTIONS))
    result.update(study=study["study"], dataset=study["dataset"], metric=metric, claimed=claimed_arm,
                  baseline=base_arm, claimed_text=_mstd(a), baseline_text=_mstd(b))
    return result


def _finish(test: dict) -> None:
    """Verdict at the adjusted p, and the evidence text with both p values."""
    test["verdict"] = verdict(test, test["p_adjusted"])
    test["fragile"] = fragile(test["p_adjusted"])
    ci = test["ci"]
    test["text"] = (f"{test['dataset']}: {test['metric']} {test['claimed']} {test['claimed_text']} vs "
                    f"{test['baseline']} {test['baseline_text']}; effect {_fmt(test['effect'])}"
                    + (f", 95% CI [{_fmt(ci[0])}, {_fmt(ci[1])}], p={test['p']:.3g}, "
                       f"Holm p={test['p_adjusted']:.3g}" if ci else "")
                    + f", margin {_fmt(test['margin'])} -> {test['verdict']}"
                    + (" (fragile: Holm p in [0.01, 0.05), more seeds wanted)" if test["fragile"] else ""))


def best_fixed(study: dict) -> str | None:
    """The fixed rung with the lowest mean test MSE (chosen after the fact: favours the baseline)."""
    fixed = [a for a in study["arms"] if a["arm"].startswith("fixed_")]
    return min(fixed, key=lambda a: a["metrics"]["recon_mse"]["mean"])["arm"] if fixed else None


def _rung_n(arm: str) -> int:
    return int(arm.split("_")[1].split("x")[0])


def claims(studies: list[dict]) -> list[dict]:
    """The papers' claims, each with a verdict per data set and overall (rules in eval.studies).

    Declared here before the runs: every test below, grouped into one family per study (``adaptive``,
    ``deferred``, ``quantizers``); Holm's method adjusts the p values within each family, and each verdict
    uses the adjusted p.
    """
    adaptive = [s for s in studies if s["study"] == "adaptive"]
    deferred = [s for s in studies if s["study"] == "deferred"]
    declared: list[tuple[str, str, list[list[dict | None]], str]] = []  # (family, claim, tests per data set, note)

    def add(family: str, claim: str, tests_per_dataset: list[list[dict | None]], note: str = "") -> None:
        declared.append((family, claim, tests_per_dataset, note))

    def rungs_test(s):
        fixed = sorted((a["arm"] for a in s["arms"] if a["arm"].startswith("fixed_")), key=_rung_n)
        best = best_fixed(s)
        if not fixed or best == fixed[0]:
            # the smallest N is best: larger N does not improve MSE (tested against the next rung)
            return _test(s, fixed[1], fixed[0], "recon_mse", True) if len(fixed) > 1 else None
        return _test(s, best, fixed[0], "recon_mse", True)

    add("adaptive", "(a) At fixed capacity W = N x D, reconstruction MSE improves as N grows and D shrinks, up to a "
        "point (best rung vs the smallest N)", [[rungs_test(s)] for s in adaptive],
        "usage per rung in the table shows how much of each codebook is alive")
    for arm, label in (("adaptive_faithful", "as the authors wrote it"), ("adaptive_working", "with a selector that learns")):
        add("adaptive", f"(b) The adaptive quantizer ({label}) beats the best fixed (N, D) at equal W (test MSE)",
            [[_test(s, arm, best_fixed(s), "recon_mse", True)] for s in adaptive],
            "the best fixed rung is chosen after the fact on the same split, which favours the baseline")
    for arm, label in (("adaptive_faithful", "authors' selector"), ("adaptive_working", "learning selector")):
        tests = []
        for s in adaptive:
            share = _values(s, arm, "early_large_n_share")
            early, late = _values(s, arm, "selection_entropy_early"), _values(s, arm, "selection_entropy_late")
            tests.append([
                _test(s, arm, "uniform", "early_large_n_share", False, claimed=share,
                      baseline=[0.5] * len(share) if share else None),
                _test(s, f"{arm}[late]", f"{arm}[early]", "selection_entropy", True, claimed=late, baseline=early),
            ])
        add("adaptive", f"(c) Two-stage dynamic ({label}): early in training the selector favours the larger-N "
            "codebooks, later it specialises (lower selection entropy)", tests)
    for arm, label in (("adaptive_faithful_scores", "the scores as logits"), ("adaptive_faithful_tau1", "tau = 1")):
        add("adaptive", f"(attribution) One change to the authors' selector ({label}) lowers the test MSE",
            [[_test(s, arm, "adaptive_faithful", "recon_mse", True)] for s in adaptive],
            "not a claim of the paper: which of the working selector's changes matter")

    add("deferred", "Early quantization shrinks the token representation: fewer codes in use (test perplexity) than "
        "deferred; baseline: the authors' early arm (k-means on the untrained encoder)",
        [[_test(s, "deferred", "early_kmeans", "perplexity", False),
          _test(s, "deferred", "early_random", "perplexity", False)] for s in deferred])
    add("deferred", "Early quantization shrinks the token representation: the codes in use spread less relative to "
        "the encoder outputs (live code distance ratio) than deferred",
        [[_test(s, "deferred", "early_kmeans", "live_code_distance_ratio", False),
          _test(s, "deferred", "early_random", "live_code_distance_ratio", False)] for s in deferred])
    add("deferred", "Deferred quantization reconstructs better than early quantization (test MSE)",
        [[_test(s, "deferred", "early_kmeans", "recon_mse", True),
          _test(s, "deferred", "early_random", "recon_mse", True)] for s in deferred])
    question = "not a claim of the paper, which compares against early quantization without resets; a reviewer's question"
    add("deferred", "Deferred quantization reconstructs better than early quantization with dead-code reset (test MSE)",
        [[_test(s, "deferred", "early_deadcode", "recon_mse", True)] for s in deferred], question)
    add("deferred", "Deferred quantization uses more codes than early quantization with dead-code reset (perplexity)",
        [[_test(s, "deferred", "early_deadcode", "perplexity", False)] for s in deferred], question)
    add("deferred", "Deferred tokens generate better (lower gFID) than early ones (k-means init), in the classifier "
        "and the label-free feature space",
        [[_test(s, "deferred", "early_kmeans", "gfid", True),
          _test(s, "deferred", "early_kmeans", "gfid_label_free", True)] for s in deferred])
    add("deferred", "Deferred tokens generate better (lower gFID) than early ones with dead-code reset, in both "
        "feature spaces", [[_test(s, "deferred", "early_deadcode", "gfid", True),
                            _test(s, "deferred", "early_deadcode", "gfid_label_free", True)] for s in deferred],
        question)
    add("deferred", "Dead-code reset on top of deferred quantization generates better (lower gFID) than deferred "
        "alone, in both feature spaces",
        [[_test(s, "deferred_deadcode", "deferred", "gfid", True),
          _test(s, "deferred_deadcode", "deferred", "gfid_label_free", True)] for s in deferred],
        "not a claim of the paper: do the two fixes add up")
    add("deferred", "Deferred tokens generate more diverse images (higher recall) than early ones (k-means init), in "
        "both feature spaces",
        [[_test(s, "deferred", "early_kmeans", "recall", False),
          _test(s, "deferred", "early_kmeans", "recall_label_free", False)] for s in deferred])

    # Our question, not a paper's: does deferring still matter for the quantizers the field compares against?
    family = [s for s in studies if s["study"] == "quantizers"]
    kinds = dict.fromkeys(a["arm"][: -len("_early")] for s in family for a in s["arms"] if a["arm"].endswith("_early"))
    for kind in kinds:
        add("quantizers", f"(question) Deferred quantization still helps {kind}: lower test MSE than quantizing from "
            "step 0", [[_test(s, f"{kind}_deferred", f"{kind}_early", "recon_mse", True)] for s in family])
        add("quantizers", f"(question) Deferred quantization still helps {kind}: more codes in use (test perplexity)",
            [[_test(s, f"{kind}_deferred", f"{kind}_early", "perplexity", False)] for s in family])

    # Holm within each family, over every test that could be run
    for name in dict.fromkeys(f for f, *_ in declared):
        tests = [t for f, _, per, _ in declared if f == name for ts in per for t in ts if t is not None]
        for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
            t["p_adjusted"] = adjusted
            t["family"] = name
            t["family_size"] = len(tests)
            _finish(t)

    out = []
    for family, claim, tests_per_dataset, note in declared:
        per_dataset, evidence, tests_out = {}, [], []
        for tests in tests_per_dataset:
            tests = [t for t in tests if t is not None]
            if not tests:
                continue
            per_dataset[tests[0]["dataset"]] = combine_verdicts([t["verdict"] for t in tests])
            evidence += [t["text"] for t in tests]
            tests_out += [{k: t[k] for k in ("dataset", "metric", "claimed", "baseline", "effect", "ci", "p",
                                             "p_adjusted", "margin", "verdict", "fragile")} for t in tests]
        if per_dataset:
            out.append({"claim": claim, "family": family, "verdict": combine_verdicts(list(per_dataset.values())),
                        "per_dataset": per_dataset, "tests": tests_out,
                        "fragile": any(t["fragile"] and t["verdict"] != "inconclusive" for t in tests_out),
                        "evidence": " | ".join(evidence) + (f" | {note}" if note else "")})
        elif tests_per_dataset:
            out.append({"claim": claim, "family": family, "verdict": "inconclusive", "per_dataset": {}, "tests": [],
                        "evidence": "not measured: the runs of this study lack the metric at this budget "
                                    "(see the study's command and budget)"})
    return out


# ----------------------------------------------------------------------------------------------- write
def write_results(args, out: Path) -> dict:
    """Rebuild results.json, results.md and plots from every finished run."""
    from benchmarks.study_report import markdown, plots

    studies = []
    for study in STUDIES:
        for dataset in DATASETS:
            s = collect(args, study, dataset)
            if s is not None:
                studies.append(s)
    results = {"studies": studies, "claims": claims(studies)}
    out.mkdir(parents=True, exist_ok=True)
    figures = plots(args, studies, out)
    save_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results, figures))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


GENERATION_OPTIONS = ("generation_arms", "generation_seeds", "prior_steps", "prior_batch_size", "prior_lr",
                      "prior_eval_every", "prior_patience", "num_images")


def budget_options(parser: argparse.ArgumentParser, args) -> list[tuple[str, str]]:
    """(dest, text) of the options of this invocation that differ from the defaults, as they would be typed."""
    out = []
    for action in parser._actions:
        if action.dest in ("help", "study", "dataset", "report_only", "runs", "out", "jobs", "allow_mixed_commits"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        for v in value if isinstance(value, list) else [value]:
            out.append((action.dest, f" {action.option_strings[0]} {shlex.quote(str(v))}"))
    return out


def study_command(args, study: str, dataset: str) -> str:
    """The command that reruns one study (generation options only where the study has generation runs)."""
    options = "".join(text for dest, text in args.budget_options
                      if study == "deferred" or dest not in GENERATION_OPTIONS)
    return f"python benchmarks/reproduce.py --study {study} --dataset {dataset}{options}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=STUDIES, action="append", help="repeat for several (default: none run)")
    parser.add_argument("--dataset", choices=DATASETS, action="append", help="repeat for several")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results from finished runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--seeds", default="", help="restrict to these seeds, e.g. 0,1 (default: the sweep's)")
    parser.add_argument("--tokenizer-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="encoder/decoder width (papers: 128); >= every D")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-samples", type=int, default=20000, help="training images at most")
    parser.add_argument("--generation-arms", default="deferred,early_kmeans,early_deadcode,deferred_deadcode")
    parser.add_argument("--generation-seeds", default="", help="default: every seed of the sweep")
    parser.add_argument("--prior-steps", type=int, default=2000,
                        help="at most (cosine schedule over them); early stopping decides")
    parser.add_argument("--prior-batch-size", type=int, default=64)
    parser.add_argument("--prior-lr", type=float, default=1e-3)
    parser.add_argument("--prior-eval-every", type=int, default=250)
    parser.add_argument("--prior-patience", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=2000, help="samples and test images for generation")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="experiment override for every run, last (e.g. evaluate.extractor=inception "
                        "evaluate.weights_path=pt_inception.pth on a machine with the weights); stated in results")
    parser.add_argument("--allow-mixed-commits", action="store_true",
                        help="build tables from runs of several code versions (the tables then say so)")
    parser.add_argument("--runs", default="runs/studies")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    args.budget_options = budget_options(parser, args)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.generation_arms = [a for a in args.generation_arms.split(",") if a]
    args.generation_seeds = [int(s) for s in args.generation_seeds.split(",") if s]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.chdir(REPO)  # experiment files name their data and sections relative to the repository
    if not args.report_only:
        for study in args.study or []:
            for dataset in args.dataset or list(DATASETS):
                runs = study_runs(args, study, dataset)
                print(f"[reproduce] {study} on {dataset}: {len(runs)} runs, {args.jobs} at a time", flush=True)
                execute(runs, args.jobs)
    return write_results(args, Path(args.out))


if __name__ == "__main__":
    main()
