"""Matplotlib figures for reports. Each function draws one PNG and returns its path.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): no global backend state, no
windows, safe to call from any process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = [
    "plot_code_usage",
    "plot_comparison",
    "plot_per_image",
    "plot_projection",
    "plot_selection",
    "plot_stage_curves",
    "plot_training_curves",
    "read_metrics",
    "schedule_markers",
    "save_grids",
]

# Panels of a training-curve figure: (title, keys drawn together, log scale on y when every value is positive and
# they span a decade or more).
# A logged ``val_<key>`` joins the panel of ``<key>`` (dashed); any other numeric key gets a panel of its own.
PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("loss",), True),
    ("reconstruction (MSE on [0,1]; L1 on [-1,1])", ("recon_mse", "recon_l1"), True),
    ("perceptual loss", ("perceptual_loss",), False),
    ("GAN: generator loss", ("gan_g_loss",), False),
    ("discriminator loss", ("disc_loss",), False),
    ("discriminator logits (mean)", ("logits_real", "logits_fake"), False),
    ("adaptive GAN weight", ("adaptive_weight",), True),
    ("code perplexity (batch)", ("perplexity",), False),
    ("code usage (batch fraction)", ("usage",), False),
    ("code distance", ("code_distance", "live_code_distance"), False),
    ("temperature tau", ("tau",), True),
    ("blend weight alpha", ("alpha",), False),
    ("selector gradient", ("selector_grad_norm", "selector_grad_rms"), True),
    ("prior validation NLL (nats/token)", ("val_nll", "best_val_nll"), False),
    ("learning rate", ("lr",), False),
)
# Logged numbers that are not curves: bookkeeping of early stopping.
NOT_CURVES = frozenset({"step", "best_step", "stopped_step", "early_stopped", "steps"})
# key -> (title, log) for the panels of single keys (plot_comparison).
CURVES = {**{key: (title, log) for title, keys, log in PANELS for key in keys},
          "recon_mse": ("reconstruction MSE ([0,1] scale)", True),
          "recon_l1": ("reconstruction L1 ([-1,1] scale)", True)}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if _is_number(r.get(key)) and "step" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _phase_changes(records: list[dict]) -> list[tuple[float, str]]:
    """(step, new phase) wherever ``phase`` changes in the records: the line sits before the first record of the
    new phase (at the last step of the old one)."""
    out, last, last_step = [], None, 0.0
    for r in records:
        phase = r.get("phase")
        if phase is not None and last is not None and phase != last:
            out.append((last_step, str(phase)))
        last = phase if phase is not None else last
        last_step = float(r.get("step", last_step))
    return out


def schedule_markers(config: dict | None) -> list[tuple[float, str]]:
    """Where a run's configuration switches something on, as (step, label) for the curves: quantization after the
    continuous phase (``schedule.ae_steps`` of a deferred run), the end of the soft blend, the GAN's start. A step
    ``s`` here is the boundary after ``s`` optimizer steps, i.e. between logged steps ``s`` and ``s + 1``. Reads the
    resolved ``config.yaml`` of a tokenizer run (a dict); a prior's config (or None) gives no markers."""
    if not isinstance(config, dict) or not isinstance(config.get("schedule"), dict):
        return []
    schedule, loss = config["schedule"], config.get("loss") or {}
    deferred = schedule.get("mode") == "deferred"
    ae_steps = int(schedule.get("ae_steps") or 0) if deferred else 0
    out = []
    if deferred:
        out.append((float(ae_steps), "quantize"))
        if schedule.get("transition_steps"):
            out.append((float(ae_steps + schedule["transition_steps"]), "blend done"))
    if (loss.get("disc_weight") or 0) > 0:
        start = loss.get("disc_start")
        start = ae_steps if start is None else int(start)
        if start > 0:
            out.append((float(start), "GAN on"))
    return sorted(out)


def _panels(records: list[dict]) -> list[tuple[str, list[str], bool]]:
    """The panels with data: ``PANELS`` in order, then one per other numeric key; ``val_<key>`` joins ``<key>``."""
    present = []
    for r in records:
        for key, value in r.items():
            if _is_number(value) and key not in NOT_CURVES and key not in present:
                present.append(key)
    placed: set[str] = set()
    panels = []
    for title, keys, log in PANELS:
        members = [k for k in keys if k in present] + [f"val_{k}" for k in keys if f"val_{k}" in present]
        if members:
            panels.append((title, members, log))
            placed.update(members)
    for key in present:
        if key in placed:
            continue
        members = [key] + ([f"val_{key}"] if f"val_{key}" in present else [])
        if key.startswith("val_") and key[4:] in present:
            continue  # drawn with its training counterpart
        panels.append((key.replace("_", " "), members, False))
        placed.update(members)
    return panels


def plot_training_curves(records: list[dict], path: str | Path, title: str = "training",
                         markers: list[tuple[float, str]] | None = None) -> Path | None:
    """Every logged numeric curve of a ``metrics.jsonl`` (grouped as ``PANELS`` says) plus the stacked
    codebook-selection fractions.

    ``markers`` ((step, label), e.g. from :func:`schedule_markers`) are drawn as dashed lines; without them the
    places where the logged ``phase`` changes are marked. Returns None without data.
    """
    panels = _panels(records)
    selection = [(r["step"], r["selection"]) for r in records if isinstance(r.get("selection"), list)]
    n = len(panels) + (1 if selection else 0)
    if n == 0:
        return None
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    changes = _phase_changes(records) if markers is None else list(markers)
    for i, (label, keys, log) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        drawn = []
        for key in keys:
            steps, values = _series(records, key)
            few = steps.size <= 20  # a handful of evaluations: show the points
            ax.plot(steps, values, lw=1.2, ls="--" if key.startswith("val_") else "-", marker="o" if few else None,
                    ms=3, label=key)
            drawn.append(values)
        values = np.concatenate(drawn)
        if log and (values > 0).all() and values.max() > 10 * values.min():  # log scale for a decade or more
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        for step, what in changes:
            ax.axvline(step, color="grey", ls="--", lw=0.8)
            ax.text(step, ax.get_ylim()[1], f" {what}", fontsize=7, va="top", color="grey")
        ax.tick_params(labelsize=7)
    if selection:
        ax = fig.add_subplot(rows, cols, n)
        steps = np.asarray([s for s, _ in selection], dtype=float)
        fractions = np.asarray([f for _, f in selection], dtype=float)  # (T, K)
        ax.stackplot(steps, fractions.T, labels=[f"book {k}" for k in range(fractions.shape[1])])
        ax.set_ylim(0, 1)
        ax.set_title("codebook selection fractions", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6, loc="upper right", ncol=2)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (empty when the file is missing; a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_stage_curves(stage_dir: str | Path, path: str | Path, title: str) -> Path | None:
    """:func:`plot_training_curves` of a trainer's run folder (``metrics.jsonl``), with the markers its
    ``config.yaml`` implies (:func:`schedule_markers`; a folder without one marks the logged phase changes)."""
    from vqgen.core.config import ConfigError, read_yaml

    stage_dir = Path(stage_dir)
    config = None
    if (stage_dir / "config.yaml").is_file():
        try:
            config = read_yaml(stage_dir / "config.yaml")
        except ConfigError:  # an unreadable config costs the markers, not the curves
            config = None
    markers = schedule_markers(config) if isinstance(config, dict) else None
    return plot_training_curves(read_metrics(stage_dir / "metrics.jsonl"), path, title, markers)


def plot_code_usage(histograms: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Rank-frequency curves of code histograms (e.g. data tokens vs sampled tokens).

    Codes are sorted by frequency per histogram, so a flat curve means uniform use and a steep drop
    means a few codes dominate; the x position where a curve ends is the number of used codes.
    """
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for name, counts in histograms.items():
        p = counts.double() / max(float(counts.sum()), 1.0)
        p = torch.sort(p[p > 0], descending=True).values.numpy()
        # Markers keep very short curves (a collapsed codebook uses 1-2 codes) visible.
        ax.plot(np.arange(1, p.size + 1), p, lw=1.4, marker="o" if p.size <= 30 else None, ms=3,
                label=f"{name} ({p.size}/{counts.numel()} codes used)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency")
    ax.set_title("code usage (rank-frequency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_selection(counts: torch.Tensor, labels: list[str], path: str | Path) -> Path:
    """Bar chart of how often each codebook of the adaptive ladder was selected."""
    fig = Figure(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    frac = (counts.double() / max(float(counts.sum()), 1.0)).numpy()
    ax.bar(np.arange(len(labels)), frac, color="tab:blue")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45, fontsize=8, ha="right")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("adaptive codebook selection")
    fig.tight_layout()
    return _save(fig, path)


def save_grids(rows: dict[str, torch.Tensor], path: str | Path, max_images: int = 10) -> Path:
    """Rows of uint8 images (N, 3, H, W), one row per name (e.g. real / reconstructed / sampled)."""
    rows = {k: v[:max_images] for k, v in rows.items() if v is not None and v.shape[0] > 0}
    n_cols = max(v.shape[0] for v in rows.values())
    fig = Figure(figsize=(1.0 * n_cols + 1.2, 1.05 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        for c in range(images.shape[0]):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            ax.imshow(images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, path)


def plot_projection(latents: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, path: str | Path,
                    title: str = "codes over encoder outputs (PCA of z_e)") -> Path:
    """Scatter the codes (K, D) over the encoder outputs (M, D), both projected on z_e's top-2 PCs.

    Shrinkage shows at a glance: codes huddled in a small part of the latent cloud. Used codes are
    coloured by log frequency; unused (dead) codes are grey crosses.
    """
    latents, codes = latents.double(), codes.double()
    mean = latents.mean(0)
    if latents.shape[1] >= 2:
        _, _, v = torch.linalg.svd(latents - mean, full_matrices=False)
        basis = v[:2].T  # (D, 2)
    else:  # D = 1: the value on x, a small jitter on y so that points do not overlap
        basis = torch.ones(1, 1, dtype=torch.float64)
    z2, c2 = (latents - mean) @ basis, (codes - mean) @ basis
    if z2.shape[1] == 1:
        g = torch.Generator().manual_seed(0)
        z2 = torch.cat([z2, 0.1 * torch.randn(z2.shape[0], 1, generator=g, dtype=torch.float64)], 1)
        c2 = torch.cat([c2, torch.zeros(c2.shape[0], 1, dtype=torch.float64)], 1)
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(z2[:, 0].numpy(), z2[:, 1].numpy(), s=2, c="0.75", alpha=0.4, label="encoder outputs z_e",
               rasterized=True)
    used = counts > 0
    if (~used).any():
        dead = c2[~used]
        ax.scatter(dead[:, 0].numpy(), dead[:, 1].numpy(), s=10, marker="x", c="0.35", lw=0.7,
                   label=f"unused codes ({int((~used).sum())})")
    if used.any():
        live = c2[used]
        sc = ax.scatter(live[:, 0].numpy(), live[:, 1].numpy(), s=12, c=np.log10(counts[used].double().numpy()),
                        cmap="viridis", label=f"used codes ({int(used.sum())})")
        fig.colorbar(sc, ax=ax, label="log10 count")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2" if latents.shape[1] >= 2 else "(jitter)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", markerscale=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_image(per_image: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Histograms of per-image PSNR and SSIM over the evaluated split."""
    keys = [k for k in ("psnr", "ssim") if k in per_image]
    fig = Figure(figsize=(4.0 * len(keys), 3.0))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        values = per_image[key].numpy()
        ax.hist(values, bins=40, color="tab:blue")
        ax.axvline(values.mean(), color="k", ls="--", lw=1, label=f"mean {values.mean():.3f}")
        ax.set_title(f"per-image {key.upper()}", fontsize=9)
        ax.set_xlabel("dB" if key == "psnr" else "SSIM", fontsize=8)
        ax.set_ylabel("images", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(runs: dict[str, list[dict]], path: str | Path,
                    keys: tuple[str, ...] = ("recon_mse", "perplexity", "code_distance", "usage")) -> Path | None:
    """Overlaid training curves of several runs, one panel per metric."""
    keys = tuple(k for k in keys if any(_series(rec, k)[0].size for rec in runs.values()))
    if not keys:
        return None
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, records in runs.items():
            steps, values = _series(records, key)
            if steps.size:
                ax.plot(steps, values, lw=1.2, label=name)
        label, log = CURVES.get(key, (key.replace("_", " "), False))
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
