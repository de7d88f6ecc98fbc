"""Why VQ with the rotation trick diverges after a deferred switch: a diagnostic of the quantizer study's finding.

In the quantizer study (``configs/experiments/study_quantizers_mnist.yaml`` at the CPU budget of
``benchmarks/reproduce.py``) the arm ``vq_rotation_deferred`` collapsed to one or two codes within a few hundred
steps of the switch in every seed. This script reruns that arm's exact configuration (same data, budget, seed and
switch) with one change per variant, and records, at every quantized training step, the mean norm of the encoder
outputs ``|x|``, the mean cosine between each output and its code ``q`` and the mean rescale ``|q| / |x|``:

- ``straight_through``: the study's ``vq_deferred`` arm (no rotation trick);
- ``rotation``: the study's ``vq_rotation_deferred`` arm (gradient ``(|q|/|x|) R^T g``);
- ``rotation_no_rescale``: the rotation ``R^T g`` without the factor ``|q| / |x|`` (a diagnostic, not an option);
- ``rescale_no_rotation``: the factor ``(|q|/|x|) g`` without the rotation (a diagnostic, not an option);
- ``rotation_beta1``: the rotation trick with commitment weight ``beta = 1`` instead of 0.25.

Then the test-split reconstruction MSE and perplexity (``reproduce.study_metrics``) per run, and the first logged
step after the switch at which the training perplexity fell below a tenth of its value at the switch::

    OMP_NUM_THREADS=1 python benchmarks/rotation_deferred.py --seeds 0,1,2 --runs runs/rotation_deferred \
        --json benchmarks/results/rotation_deferred.json

Finished runs are reused when the script is run again (a run's trajectory is kept beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402
import vqgen.tokenizer.quantizers.base as quantizer_base  # noqa: E402
from vqgen.core.io import load_json, save_json  # noqa: E402

ARM = "vq_rotation_deferred"
VARIANTS = {  # name: (experiment overrides, gradient to the encoder)
    "straight_through": (["tokenizer.model.quantizer.rotation_trick=false"], "straight_through"),
    "rotation": ([], "rotation"),
    "rotation_no_rescale": ([], "rotation_no_rescale"),
    "rescale_no_rotation": ([], "rescale_no_rotation"),
    "rotation_beta1": (["tokenizer.model.quantizer.beta=1.0"], "rotation"),
}


class _Variant(torch.autograd.Function):
    """Forward: the codes; backward: one part of the rotation trick's map (``mode``), for the diagnostic."""

    @staticmethod
    def forward(ctx, x, q, mode):
        ctx.save_for_backward(x, q)
        ctx.mode = mode
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        x, q = ctx.saved_tensors
        eps = quantizer_base.ROTATION_EPS
        scale = q.norm(dim=-1, keepdim=True).clamp_min(eps) / x.norm(dim=-1, keepdim=True).clamp_min(eps)
        if ctx.mode == "rescale_no_rotation":
            return scale * grad, None, None
        # rotation_no_rescale: the library's map divided by its rescale factor
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (rotated,) = torch.autograd.grad(quantizer_base._RotationTrick.apply(xx, q), xx, grad)
        return rotated / scale, None, None


class Probe:
    """Replaces the encoder-gradient functions of ``quantizer_base`` for one run and records, at every training
    forward pass (one per optimizer step), ``|x|``, ``cos(x, q)`` and ``|q| / |x|`` averaged over the vectors."""

    def __init__(self, gradient: str):
        self.gradient = gradient
        self.rows: list[tuple[float, float, float]] = []
        self.saved = (quantizer_base.rotation_trick, quantizer_base.straight_through)

    def __enter__(self):
        rotation, straight = self.saved

        def wrapped(x, q):
            if torch.is_grad_enabled() and x.requires_grad:
                with torch.no_grad():
                    xn, qn = x.norm(dim=-1), q.norm(dim=-1)
                    cos = torch.nn.functional.cosine_similarity(x, q, dim=-1)
                    row = torch.stack([xn.mean(), cos.mean(), (qn / xn.clamp_min(1e-12)).mean()])
                    self.rows.append(tuple(row.tolist()))  # one read-back per step
            if self.gradient == "straight_through":
                return straight(x, q)
            if self.gradient == "rotation":
                return rotation(x, q)
            return _Variant.apply(x, q.detach(), self.gradient)

        quantizer_base.rotation_trick = quantizer_base.straight_through = wrapped
        return self

    def __exit__(self, *exc):
        quantizer_base.rotation_trick, quantizer_base.straight_through = self.saved


def collapse_step(run_dir: Path, ae_steps: int) -> int | None:
    """First logged step after the switch whose training perplexity is below a tenth of the first one's."""
    rows = [r for r in reproduce.read_jsonl(run_dir / "tokenizer" / "metrics.jsonl")
            if r.get("phase") == "quantize" and r.get("perplexity") is not None and r["step"] > ae_steps]
    if not rows:
        return None
    first = rows[0]["perplexity"]
    return next((r["step"] for r in rows if r["perplexity"] < 0.1 * first), None)


def run_variant(spec: dict, variant: str, root: Path) -> dict:
    from vqgen.pipelines.run import load_experiment, run_experiment

    overrides, gradient = VARIANTS[variant]
    run_dir = root / f"{variant}_s{spec['seed']}"
    cfg = load_experiment(spec["config"], [*spec["overrides"], *overrides, f"output_dir={run_dir}"])
    trajectory_path = run_dir / "rotation_probe.json"
    t0 = time.perf_counter()
    with Probe(gradient) as probe:
        run_experiment(cfg)
    if probe.rows:  # trained in this call (a resumed run records the steps it trained)
        save_json({"complete": len(probe.rows) >= cfg.tokenizer.train.steps - cfg.tokenizer.schedule.ae_steps,
                   "rows": probe.rows}, trajectory_path)
    trajectory = load_json(trajectory_path) if trajectory_path.is_file() else {"complete": False, "rows": []}
    metrics = reproduce.study_metrics(run_dir, oracle=False)
    rows = trajectory["rows"]

    def at(i):  # (|x|, cos, rescale) averaged over 10 steps from quantized step i
        window = rows[i:i + 10]
        return [round(statistics.fmean(c), 4) for c in zip(*window)] if window else None

    return {"variant": variant, "seed": spec["seed"], "test_mse": metrics["recon_mse"],
            "test_perplexity": metrics["perplexity"], "collapse_step": collapse_step(run_dir, cfg.tokenizer.schedule.ae_steps),
            "switch": at(0), "after_100": at(100), "after_200": at(200), "end": at(max(0, len(rows) - 10)),
            "trajectory_complete": trajectory["complete"], "seconds": round(time.perf_counter() - t0, 1)}


def table(records: list[dict]) -> str:
    lines = ["| variant | test MSE | test perplexity | collapsed (step) | cos(x, q) switch -> +200 -> end | "
             "|x| switch -> end |", "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rs = [r for r in records if r["variant"] == variant]
        if not rs:
            continue

        def cell(key, digits):
            vals = [r[key] for r in rs]
            spread = f" +- {statistics.stdev(vals):.{digits}g}" if len(vals) > 1 else ""
            return f"{statistics.fmean(vals):.{digits}g}{spread} ({', '.join(f'{v:.{digits}g}' for v in vals)})"

        collapsed = [str(r["collapse_step"]) for r in rs if r["collapse_step"] is not None]
        cos = "; ".join(f"{r['switch'][1]:.2f} -> {r['after_200'][1]:.2f} -> {r['end'][1]:.2f}"
                        for r in rs if r["switch"] and r["after_200"] and r["end"])
        norm = "; ".join(f"{r['switch'][0]:.2f} -> {r['end'][0]:.2f}" for r in rs if r["switch"] and r["end"])
        lines.append(f"| {variant} | {cell('test_mse', 3)} | {cell('test_perplexity', 3)} | "
                     f"{len(collapsed)} of {len(rs)} ({', '.join(collapsed) or '-'}) | {cos} | {norm} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", default="runs/rotation_deferred")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    root = Path(args.runs).resolve()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("VQGEN_NO_PROGRESS", "1")
    os.chdir(REPO)  # the sweep names its data relative to the repository
    budget = reproduce.parse_args(["--seeds", args.seeds])  # the study's default CPU budget
    specs = [s for s in reproduce.study_runs(budget, "quantizers", "mnist") if s["arm"] == ARM]
    records = []
    for spec in specs:
        for variant in variants:
            record = run_variant(spec, variant, root)
            print(json.dumps(record), flush=True)
            records.append(record)
    commits = sorted({c for r in records
                      for c in reproduce.commits_of(reproduce.run_provenance(root / f"{r['variant']}_s{r['seed']}"))})
    out = {"arm": ARM, "study": "quantizers_mnist", "budget": budget.budget_options, "hardware": reproduce.hardware(),
           "commits": commits, "command": "python benchmarks/rotation_deferred.py " + " ".join(argv or sys.argv[1:]),
           "records": records, "table": table(records)}
    print(out["table"])
    if args.json:
        save_json(out, Path(args.json))
    return out


if __name__ == "__main__":
    main()
