"""Tables and plots of ``benchmarks/reproduce.py``'s studies (results.md and its figures)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

ADAM_EPS = 1e-8
TOKENIZER_COLUMNS = [("recon_mse", "test MSE"), ("psnr", "PSNR"), ("perplexity", "perplexity"), ("usage", "usage"),
                     ("live_code_distance_ratio", "live distance ratio"), ("live_code_distance", "live distance"),
                     ("code_distance", "all-code distance"), ("images_per_second", "images/s")]
ADAPTIVE_COLUMNS = [("oracle_mse", "oracle MSE"), ("selection_entropy", "selection entropy (nats)"),
                    ("tau_last_step", "selector tau at the last step"), ("tau_end", "selector tau after training"),
                    ("early_large_n_share", "early large-N share"), ("selector_grad_rms_median", "selector grad RMS (Adam eps 1e-8)")]
GENERATION_COLUMNS = [("gfid", "gFID (classifier)"), ("recall", "recall (classifier)"),
                      ("coverage", "coverage (classifier)"), ("gfid_label_free", "gFID (label-free)"),
                      ("recall_label_free", "recall (label-free)"), ("coverage_label_free", "coverage (label-free)"),
                      ("mode_coverage", "mode coverage"), ("prior_val_nll", "prior val NLL"),
                      ("prior_best_step", "prior best step"),
                      ("label_free_knn_accuracy", "label-free space: its k-NN check (accuracy)")]


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def cell(metric: dict | None) -> str:
    """``mean +- std [v1, v2, ...]``: every seed's value shown."""
    if not metric:
        return "-"
    values = ", ".join(_fmt(v) for v in metric["values"])
    if len(metric["values"]) == 1:
        return f"{_fmt(metric['mean'])} [1 seed]"
    return f"{_fmt(metric['mean'])} +- {_fmt(metric['std'])} [{values}]"


def table(study: dict, columns: list[tuple[str, str]]) -> list[str]:
    """A Markdown table of the arms (rows) that have any of ``columns``."""
    rows = [a for a in study["arms"] if any(k in a["metrics"] for k, _ in columns)]
    if not rows:
        return []
    present = [(k, label) for k, label in columns if any(k in a["metrics"] for a in rows)]
    lines = ["| arm | " + " | ".join(label for _, label in present) + " |",
             "|---" * (len(present) + 1) + "|"]
    for a in rows:
        lines.append(f"| {a['arm']} | " + " | ".join(cell(a["metrics"].get(k)) for k, _ in present) + " |")
    return lines


def per_codebook_table(study: dict) -> list[str]:
    """Adaptive arms: per-codebook selection share, usage and forced-branch MSE (means over seeds)."""
    lines = []
    for a in study["arms"]:
        books = [k[len("selection_"):] for k in a["metrics"] if k.startswith("selection_") and "x" in k
                 and k[len("selection_"):].split("x")[0].isdigit()]
        if not books:
            continue
        if not lines:
            lines = ["| arm | codebook | selection share | usage of its codes | MSE with this branch forced |",
                     "|---|---|---|---|---|"]
        for b in books:
            lines.append(f"| {a['arm']} | {b} | {cell(a['metrics'].get('selection_' + b))} | "
                         f"{cell(a['metrics'].get('usage_' + b))} | {cell(a['metrics'].get('branch_mse_' + b))} |")
    return lines


def budget_line(study: dict) -> str:
    b = study["budget"]
    return (f"Budget (same for every arm): {b['tokenizer_steps']} tokenizer steps, batch {b['batch_size']}, hidden "
            f"width {b['hidden']} (papers: 128), lr {b['lr']}, at most {b['max_train_images']} training images; "
            f"every number on the {b['split']} split. Hardware: {study['hardware']}. "
            f"{b['run_minutes_single_thread']} single-thread minutes of runs. The images/s column is the "
            f"tokenizer's training rate while other runs shared the CPU: read it as a rough cost, not a speed "
            f"comparison (`benchmarks/tokenizer_throughput.py` measures that). Command: `{study['command']}`."
            + (f" Overrides for every run: {', '.join(b['overrides'])}." if b.get("overrides") else ""))


def provenance_line(study: dict) -> str:
    """The code the runs were made by (one commit, or a warning that they mix several) and their packages."""
    commits = study.get("commits") or []
    versions = next((p.get("versions") for p in (study.get("provenance") or {}).values() if p.get("versions")), None)
    packages = ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "not recorded"
    if study.get("mixed_commits"):
        return (f"**Mixed code**: the runs of this table were made by {', '.join(commits) or 'unrecorded code'} "
                f"(built with --allow-mixed-commits). Packages: {packages}.")
    if len(commits) > 1:
        return (f"Runs made by commits {', '.join(f'`{c}`' for c in commits)} (clean), which differ in study sweeps, "
                f"tests and prose only (`git diff --name-only`): one code, rerun from `{study['code_commit']}`. "
                f"Packages: {packages}.")
    return f"Every run made by commit `{commits[0]}` (clean). Packages: {packages}."


def markdown(results: dict, figures: dict[str, list[str]]) -> str:
    lines = [
        "# Results: the papers' claims, several seeds, CPU-sized runs",
        "",
        "Produced by `benchmarks/reproduce.py` (raw numbers, per-run provenance: `results.json` beside this file). "
        "Every cell is mean +- sample std over seeds, followed by every seed's value. Verdicts follow fixed rules "
        "(`eval/studies.py`), declared before the runs: Welch's t-test and its 95% interval per comparison; the "
        "comparisons of one study form one family whose p values are adjusted by Holm's method, and a verdict uses "
        "the adjusted p (both are shown): *reproduces* when it is below 0.05 in the claimed direction, *does not "
        "reproduce* when it is below 0.05 the other way or the whole interval lies within the margin of equivalence "
        "(5% of the baseline, or 0.05 for fractions); otherwise *inconclusive*. Over data sets (and over the "
        "baselines of one claim) the verdict is the one they all share, else *inconclusive*. The runs are far "
        "shorter than the papers' (the budget is stated per study): a verdict holds for this budget. A verdict marked "
        "*fragile* rests on an adjusted p between 0.01 and 0.05: it holds, but more seeds should confirm it.",
        "",
        "## Verdicts",
        "",
        "| claim | family | verdict | per data set | evidence |",
        "|---|---|---|---|---|",
    ]
    for c in results["claims"]:
        per = ", ".join(f"{d}: {v}" for d, v in (c.get("per_dataset") or {}).items()) or "-"
        mark = " (fragile)" if c.get("fragile") else ""
        lines.append(f"| {c['claim']} | {c.get('family', '-')} | **{c['verdict']}**{mark} | {per} | "
                     f"{c['evidence'].replace('|', '/')} |")
    lines.append("")
    for s in results["studies"]:
        title = {"adaptive": "Adaptive vs fixed (N, D) at W = 65536", "deferred": "Early vs deferred quantization",
                 "quantizers": "The quantizer family, early vs deferred"}
        lines += [f"## {title[s['study']]}: {s['dataset']}", "", budget_line(s), "", provenance_line(s), ""]
        lines += table(s, TOKENIZER_COLUMNS) + [""]
        if s["study"] == "adaptive":
            lines += table(s, ADAPTIVE_COLUMNS) + [""]
            lines += per_codebook_table(s) + [""]
        else:
            gen = table(s, GENERATION_COLUMNS)
            if gen:
                lines += ["Generation (class-conditional prior, early stopping on validation NLL; "
                          f"{s['budget']['num_generated_images']} samples vs as many test images):", ""] + gen + [""]
        for fig in figures.get(f"{s['study']}_{s['dataset']}", []):
            lines.append(f"![{fig}]({fig})")
        lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def _curves(args, study: str, dataset: str, arm: str, key: str) -> tuple[list[int], torch.Tensor] | None:
    """Logged ``key`` over training steps for every seed of an arm: (steps, (seeds, T[, K]))."""
    root = Path(args.runs) / f"{study}_{dataset}"
    series = []
    for run in sorted(root.glob(f"{arm}_s*")):
        path = run / "tokenizer" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get(key) is not None]
        if rows:
            series.append(([r["step"] for r in rows], [r[key] for r in rows]))
    if not series:
        return None
    length = min(len(v) for _, v in series)
    return series[0][0][:length], torch.tensor([v[:length] for _, v in series], dtype=torch.float64)


def plots(args, studies: list[dict], out: Path) -> dict[str, list[str]]:
    """Write each study's figures into ``out``; returns file names per ``<study>_<dataset>``."""
    figures: dict[str, list[str]] = {}
    for s in studies:
        key = f"{s['study']}_{s['dataset']}"
        names = []
        if s["study"] == "adaptive":
            names += _ladder_plot(s, out / f"{key}_ladder.png")
            names += _selection_plot(args, s, out / f"{key}_selection.png")
        else:
            names += _schedule_curves(args, s, out / f"{key}_curves.png")
        figures[key] = names
    return figures


def _ladder_plot(s: dict, path: Path) -> list[str]:
    fixed = sorted((a for a in s["arms"] if a["arm"].startswith("fixed_")),
                   key=lambda a: int(a["arm"].split("_")[1].split("x")[0]))
    if not fixed:
        return []
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ns = [int(a["arm"].split("_")[1].split("x")[0]) for a in fixed]
    means = [a["metrics"]["recon_mse"]["mean"] for a in fixed]
    stds = [a["metrics"]["recon_mse"]["std"] for a in fixed]
    ax.errorbar(ns, means, yerr=stds, fmt="o-", color="C0", capsize=3, label="fixed (N, D), mean +- std")
    for n, a in zip(ns, fixed):
        vals = a["metrics"]["recon_mse"]["values"]
        ax.scatter([n] * len(vals), vals, s=10, color="C0", alpha=0.5)
    for i, arm in enumerate(a for a in s["arms"] if a["arm"].startswith("adaptive")):
        m = arm["metrics"]["recon_mse"]
        ax.axhline(m["mean"], color=f"C{i + 1}", ls="--", label=f"{arm['arm']} (chosen)")
        ax.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color=f"C{i + 1}", alpha=0.12)
        if "oracle_mse" in arm["metrics"]:
            ax.axhline(arm["metrics"]["oracle_mse"]["mean"], color=f"C{i + 1}", ls=":",
                       label=f"{arm['arm']} (per-image best branch)")
    ax.set(xscale="log", xlabel="codebook size N (D = 65536 / N)", ylabel="test MSE",
           title=f"{s['dataset']}: reconstruction at equal capacity W = 65536")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [path.name]


def _selection_plot(args, s: dict, path: Path) -> list[str]:
    arms = [a["arm"] for a in s["arms"] if a["arm"].startswith("adaptive")]
    if not arms:
        return []
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, len(arms) + 1)
    for ax, arm in zip(axes, arms):
        curves = _curves(args, "adaptive", s["dataset"], arm, "selection")
        if curves is None:
            continue
        steps, values = curves  # (seeds, T, K)
        mean = values.mean(0)
        books = [b for b in _arm_books(s, arm)] or [f"codebook {k}" for k in range(mean.shape[1])]
        for k in range(mean.shape[1]):
            ax.plot(steps, mean[:, k].tolist(), label=books[k] if k < len(books) else f"codebook {k}")
        ax.set(xlabel="step", ylabel="share of units (mean over seeds)", title=f"{arm}: selection", ylim=(0, 1))
        ax.legend(fontsize=6)
    ax = axes[-1]
    for i, arm in enumerate(arms):
        curves = _curves(args, "adaptive", s["dataset"], arm, "selector_grad_rms")
        if curves is None:
            continue
        steps, values = curves
        ax.plot(steps, values.median(0).values.tolist(), color=f"C{i}", label=arm)
    ax.axhline(ADAM_EPS, color="k", ls=":", label="Adam eps")
    ax.set(yscale="log", xlabel="step", ylabel="selector gradient, RMS per parameter (median over seeds)",
           title="does the selector learn?")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [path.name]


def _arm_books(s: dict, arm: str) -> list[str]:
    """``NxD`` names of an adaptive arm's codebooks, in ladder order (from its per-codebook metrics)."""
    a = next((a for a in s["arms"] if a["arm"] == arm), None)
    if a is None:
        return []
    return [k[len("selection_"):] for k in a["metrics"]
            if k.startswith("selection_") and k[len("selection_"):].split("x")[0].isdigit()]


def _schedule_curves(args, s: dict, path: Path) -> list[str]:
    arms = [a["arm"] for a in s["arms"]]
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    for i, arm in enumerate(arms):
        for ax, key in zip(axes, ("perplexity", "live_code_distance", "recon_mse")):
            curves = _curves(args, s["study"], s["dataset"], arm, key)
            if curves is None:
                continue
            steps, values = curves
            ax.plot(steps, values.mean(0).tolist(), color=f"C{i % 10}", ls="--" if i >= 10 else "-", label=arm)
    axes[0].set(xlabel="step", ylabel="batch perplexity", yscale="log", title="codes in use")
    axes[1].set(xlabel="step", ylabel="live code distance (batch)", title="spread of the codes in use")
    axes[2].set(xlabel="step", ylabel="training MSE", yscale="log", title="reconstruction")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{s['dataset']}: {s['study']} study, curves per arm (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [path.name]
