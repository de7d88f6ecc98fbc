"""Reproduce the papers' two findings and write a Markdown results table (+ JSON + plots).

1. Adaptive dynamic quantization (Chen et al. 2024): at a fixed capacity W = N x D, every fixed (N, D) of the
   ladder vs the adaptive quantizer (MSE, perplexity, usage; selection fractions over training).
2. Deferred quantization (Zhao et al.): EMA VQ quantized from step 0 vs after a continuous phase with k-means
   on the trained encoder, at N = 512 and a larger N (tokenizer metrics, then a class-conditional prior,
   samples and generation metrics: gFID, recall, coverage, mode coverage, token perplexity).

It runs the experiment files in ``configs/experiments/`` through the same runner as ``vqgen run``, with the
step counts and widths given here (the full-step configs are what a GPU user runs unchanged). Runs are
resumable: rerunning the same command skips finished stages. Example (what produced docs/results.md)::

    python benchmarks/reproduce.py --datasets mnist,cifar10 --tokenizer-steps 600 --prior-steps 400
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from matplotlib.figure import Figure
from pipelines.run import load_experiment, run_experiment
from tokenizer.io import save_json

LADDER = [(512, 128), (1024, 64), (2048, 32), (4096, 16), (8192, 8), (16384, 4), (32768, 2), (65536, 1)]
DEFERRED_VARIANTS = ("ema_early", "ema_deferred", "ema_early_n4096", "ema_deferred_n4096")


def overrides_for(args, variant: str, run_dir: Path) -> list[str]:
    """The CPU reductions applied on top of a full-size experiment file (all stated in the results)."""
    steps = args.tokenizer_steps
    o = [
        f"output_dir={run_dir}",
        f"tokenizer.train.steps={steps}",
        f"tokenizer.train.batch_size={args.batch_size}",
        f"tokenizer.train.log_every={max(1, steps // 50)}",
        f"tokenizer.train.checkpoint_every={max(1, steps // 3)}",
        f"tokenizer.model.hidden={args.hidden}",
        f"tokenizer.data.max_samples={args.max_samples}",
        f"tokenizer.train.lr={args.lr}",
    ]
    if variant == "adaptive":
        o.append(f"tokenizer.model.quantizer.selector_tau_steps={steps}")
    if "deferred" in variant:
        o.append(f"tokenizer.schedule.ae_steps={steps // 2}")
    if variant in DEFERRED_VARIANTS:
        p = args.prior_steps
        o += [
            f"prior.train.steps={p}", f"prior.train.warmup_steps={max(1, p // 20)}",
            f"prior.train.log_every={max(1, p // 40)}", f"prior.train.eval_every={p}",
            f"prior.train.checkpoint_every={max(1, p // 2)}", f"prior.train.batch_size={args.batch_size}",
            "prior.model.n_layer=4", "prior.model.n_head=4", "prior.model.n_embd=128", "prior.model.dropout=0.0",
            f"sample.num_samples={args.num_images}", f"evaluate.num_images={args.num_images}",
            f"evaluate.classifier.max_steps={args.classifier_steps}",
        ]
    if variant == "adaptive" or variant in DEFERRED_VARIANTS:
        o += args.override  # the studied change of a tagged variant study (never applied to fixed baselines)
    return o


def run_dir_of(args, dataset: str, variant: str) -> Path:
    """Run folder of a variant; the fixed (N, D) baselines are shared by every tag (no override reaches them)."""
    tagged = args.tag and not variant.startswith("fixed_")
    return Path(args.runs) / (f"{dataset}_{variant}" + (f"_{args.tag}" if tagged else ""))


def run_variant(args, dataset: str, variant: str) -> Path:
    run_dir = run_dir_of(args, dataset, variant)
    base = Path(args.runs) / f"{dataset}_{variant}"
    if run_dir != base and args.reuse_tokenizer and not run_dir.exists() and (base / "tokenizer" / "summary.json").is_file():
        # same tokenizer settings, different later stages: start from the trained tokenizer and its tokens
        for part in ("tokenizer", "tokens"):
            shutil.copytree(base / part, run_dir / part)
    cfg = load_experiment(Path("configs/experiments") / f"{dataset}_{variant}.yaml", overrides_for(args, variant, run_dir))
    t0 = time.perf_counter()
    run_experiment(cfg)
    elapsed = time.perf_counter() - t0
    # wall time spent on this run, summed over invocations (a rerun that only skips adds ~0)
    clock = run_dir / "reproduce_seconds.json"
    total = (json.loads(clock.read_text())["seconds"] if clock.is_file() else 0.0) + elapsed
    save_json({"seconds": total}, clock)
    print(f"[reproduce] {run_dir.name}: {elapsed:.0f}s (total {total:.0f}s)")
    return run_dir


def run_minutes(args, dataset: str, variants) -> float:
    """Wall-clock minutes the runs of one section took, from their own records."""
    total = 0.0
    for variant in variants:
        clock = run_dir_of(args, dataset, variant) / "reproduce_seconds.json"
        total += json.loads(clock.read_text())["seconds"] if clock.is_file() else 0.0
    return total / 60


def read_metrics(run: Path) -> list[dict]:
    path = run / "tokenizer" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adaptive_study(args, dataset: str, out: Path) -> dict:
    """Every fixed (N, D) of the ladder and the adaptive quantizer; returns rows + writes two plots."""
    rows = []
    for n, d in LADDER:
        run = run_variant(args, dataset, f"fixed_{n}x{d}")
        s = json.loads((run / "tokenizer" / "summary.json").read_text())
        rows.append({"quantizer": f"fixed {n}x{d}", "N": n, "D": d, **_tok(s)})
    run = run_variant(args, dataset, "adaptive")
    s = json.loads((run / "tokenizer" / "summary.json").read_text())
    rows.append({"quantizer": "adaptive", "N": None, "D": None, **_tok(s), "selection": s.get("selection")})
    metrics = [r for r in read_metrics(run) if r.get("selection")]

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = [r["step"] for r in metrics]
    window = 5  # per-batch fractions are noisy: show a running mean over 5 logged steps
    for i, (n, d) in enumerate(LADDER):
        values = torch.tensor([r["selection"][i] for r in metrics], dtype=torch.float64)
        smooth = torch.nn.functional.avg_pool1d(values[None, None], window, 1, padding=window // 2,
                                                count_include_pad=False)[0, 0]
        ax.plot(steps, smooth[: len(steps)].tolist(), label=f"{n}x{d}")
    ax.set(xlabel="step", ylabel=f"fraction of selections (running mean of {window})",
           title=f"{dataset}: adaptive selector's codebook choice")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{dataset}_{study_key(args, 'adaptive')}_selection.png", dpi=110)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    fixed = rows[:-1]
    ax.plot([r["N"] for r in fixed], [r["recon_mse"] for r in fixed], "o-", label="fixed (N, D), W = 65536")
    ax.axhline(rows[-1]["recon_mse"], color="C3", ls="--", label="adaptive")
    ax.set(xscale="log", xlabel="codebook size N (D = 65536 / N)", ylabel="validation MSE",
           title=f"{dataset}: MSE at equal capacity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{dataset}_{study_key(args, 'adaptive')}_ladder_mse.png", dpi=110)
    return {"rows": rows}


def deferred_study(args, dataset: str, out: Path) -> dict:
    rows = []
    for variant in args.variants:
        run = run_variant(args, dataset, variant)
        report = json.loads((run / "report.json").read_text())
        tok, gen = report["tokenizer"], report["generation"]
        rows.append({
            "run": variant, "N": 4096 if "n4096" in variant else 512,
            "schedule": "deferred" if "deferred" in variant else "early",
            "recon_mse": tok["recon_mse"], "perplexity": tok["perplexity"], "usage": tok["usage"],
            "code_distance": tok["code_distance"], "rfid": tok.get("rfid"), "gfid": gen.get("fid"),
            "recall": gen.get("recall"), "coverage": gen.get("coverage"), "mode_coverage": gen.get("mode_coverage"),
            "token_perplexity": gen.get("token_perplexity"),
            "feature_extractor": report.get("feature_extractor", {}).get("name"),
        })
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for variant in args.variants:
        m = [r for r in read_metrics(run_dir_of(args, dataset, variant)) if r.get("perplexity") is not None]
        axes[0].plot([r["step"] for r in m], [r["perplexity"] for r in m], label=variant)
        axes[1].plot([r["step"] for r in m], [r["code_distance"] for r in m], label=variant)
    axes[0].set(xlabel="step", ylabel="batch perplexity", yscale="log", title=f"{dataset}: code perplexity")
    axes[1].set(xlabel="step", ylabel="mean pairwise code distance", title=f"{dataset}: code spread")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{dataset}_{study_key(args, 'deferred')}_curves.png", dpi=110)
    return {"rows": rows}


def study_key(args, study: str) -> str:
    """Where a study's results go in results.json: the study name, plus the tag of a variant run."""
    return f"{study}-{args.tag}" if args.tag else study


def _tok(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("recon_mse", "psnr", "perplexity", "usage", "code_distance")}


def fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def settings_line(s: dict) -> str:
    """How a section's numbers were produced (CPU-sized settings, stated next to the table)."""
    line = (f"Produced by `{s['command']}` on {s['device']} ({s['threads']} thread(s), {s['minutes']:.0f} min for "
            f"this section). Tokenizer: {s['tokenizer_steps']} steps, batch {s['batch_size']}, hidden width "
            f"{s['hidden']} (papers: 128), at most {s['max_samples']} training images.")
    return line


def markdown(results: dict) -> str:
    lines = [
        "# Results: the papers' findings on CPU-sized runs",
        "",
        "Every number below comes from `benchmarks/reproduce.py`; the raw output is `results.json` next to this "
        "file. The runs are far shorter than the papers' (stated per table): read them as a check of the "
        "direction of each effect, not of its size. The configs in `configs/experiments/` with full steps are "
        "what a GPU user runs.",
        "",
    ]
    adaptive = [(key, ds, study) for key in sorted(results) if key.startswith("adaptive")
                for ds, study in results[key].items()]
    for key, ds, study in adaptive:
        s = study["settings"]
        title = f"Adaptive vs fixed (N, D) at W = 65536 ({ds}" + (f", {s['tag']}" if s.get("tag") else "") + ")"
        changes = f" Adaptive run changed by: `{' '.join(s['override'])}`." if s.get("override") else ""
        lines += [f"## {title}", "", settings_line(s) + changes, "",
                  "| quantizer | val MSE | PSNR | perplexity | usage |", "|---|---|---|---|---|"]
        for r in study["rows"]:
            lines.append(f"| {r['quantizer']} | {fmt(r['recon_mse'])} | {fmt(r['psnr'])} | {fmt(r['perplexity'])} | {fmt(r['usage'])} |")
        sel = study["rows"][-1].get("selection")
        if sel:
            lines += ["", "Adaptive selection over the validation split: " + ", ".join(
                f"{n}x{d}: {f:.2f}" for (n, d), f in zip(LADDER, sel))]
        lines += ["", f"![MSE vs N]({ds}_{key}_ladder_mse.png) ![selection]({ds}_{key}_selection.png)", ""]
    deferred = [(key, ds, study) for key in sorted(results) if key.startswith("deferred")
                for ds, study in results[key].items()]
    for key, ds, study in deferred:
        s = study["settings"]
        title = f"Early vs deferred quantization, EMA VQ, D = 64 ({ds}" + (f", {s['tag']}" if s.get("tag") else "") + ")"
        changes = f" Changed by: `{' '.join(s['override'])}`." if s.get("override") else ""
        lines += [f"## {title}", "", settings_line(s) + changes,
                  f" Deferred: the first half continuous, then k-means on the trained encoder. Priors: {s['prior_steps']} "
                  f"steps (4 layers, width 128), {s['num_images']} samples vs {s['num_images']} test images, features "
                  "from the offline classifier (not Inception: no network here).", "",
                  "| N | schedule | val MSE | perplexity | usage | code distance | rFID | gFID | recall | coverage | mode coverage | token perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in study["rows"]:
            lines.append("| " + " | ".join(fmt(r[k]) for k in (
                "N", "schedule", "recon_mse", "perplexity", "usage", "code_distance", "rfid", "gfid", "recall",
                "coverage", "mode_coverage", "token_perplexity")) + " |")
        lines += ["", f"![curves]({ds}_{key}_curves.png)", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,cifar10")
    parser.add_argument("--studies", default="adaptive,deferred")
    parser.add_argument("--tokenizer-steps", type=int, default=600)
    parser.add_argument("--prior-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-samples", type=int, default=20000)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    parser.add_argument("--runs", default="runs/reproduce")
    parser.add_argument("--variants", default=",".join(DEFERRED_VARIANTS),
                        help="deferred study: which of " + ", ".join(DEFERRED_VARIANTS))
    parser.add_argument("--tag", default="", help="suffix for run folders and the results key (a variant study)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="experiment override for the studied runs of a tagged study (adaptive / deferred runs)")
    parser.add_argument("--reuse-tokenizer", action="store_true",
                        help="with --tag: start from the untagged run's trained tokenizer and tokens")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.override and not args.tag:
        parser.error("--override changes what a study measures: give it a --tag so its runs and results stay apart")
    unknown = [v for v in args.variants if v not in DEFERRED_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose among {', '.join(DEFERRED_VARIANTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # results.json accumulates: each (study, dataset) keeps the settings it was produced with
    results_path = out / "results.json"
    results: dict = {}
    argv_str = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    for ds in [d for d in args.datasets.split(",") if d]:
        for study in [s for s in args.studies.split(",") if s]:
            entry = (adaptive_study if study == "adaptive" else deferred_study)(args, ds, out)
            variants = args.variants if study == "deferred" else [f"fixed_{n}x{d}" for n, d in LADDER] + ["adaptive"]
            entry["settings"] = {
                **vars(args),
                "command": f"python benchmarks/reproduce.py {argv_str}".strip(),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "minutes": run_minutes(args, ds, variants),
                "torch": torch.__version__,
            }
            # re-read: another invocation (e.g. the other data set, run in parallel) may have added sections
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results.setdefault(study_key(args, study), {})[ds] = entry
            save_json(results, results_path)
            (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
