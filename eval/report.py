"""Reports: ``report.json`` for machines, ``report.md`` and ``report.html`` (same content) for people.

A report is a nested dict of numbers (dotted names such as ``tokenizer.psnr`` are nested objects) plus
figures. :func:`write_report` renders one run; :func:`write_comparison` renders a table of several runs.
A report's ``feature_spaces`` (one entry per feature extractor, by name) is rendered as one table with a
column per space, so every FID-type number is shown under the name of the space it comes from.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from vqgen.core.io import atomic_path, save_json

__all__ = ["flatten", "format_value", "write_comparison", "write_report"]

# Sections of a run report, in display order, with a sentence saying what they show.
SECTIONS = {
    "tokenizer": "Reconstruction of the evaluation split and codebook use by the tokenizer.",
    "codebook": "Shrinkage diagnostics: how the codes spread compared with the encoder outputs.",
    "generation": "Samples of the prior against the real split (FID-type metrics use the feature extractor below).",
    "feature_extractor": "Feature extractor behind FID, KID, precision/recall, density/coverage and mode coverage.",
}
# Rows of the feature-space table: (label, dotted key inside report["feature_spaces"][name]).
SPACE_ROWS = (
    ("extractor", "feature_extractor.torch_fidelity_name"),
    ("label-free", "feature_extractor.label_free"),
    ("weights sha256", "feature_extractor.weights_sha256"),
    ("k-NN accuracy (held-out labels)", "feature_extractor.knn_accuracy"),
    ("classifier test accuracy", "feature_extractor.test_accuracy"),
    ("rfid", "rfid"),
    ("rkid", "rkid"),
    ("generation.fid", "generation.fid"),
    ("generation.kid", "generation.kid"),
    ("generation.precision", "generation.precision"),
    ("generation.recall", "generation.recall"),
    ("generation.density", "generation.density"),
    ("generation.coverage", "generation.coverage"),
)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_value(value) -> str:
    """Short human form of a report value."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) > 12:
            return f"[{len(value)} values]"
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def _md_table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
    "figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
)


def _write_docs(out_dir: Path, stem: str, title: str, blocks: list[tuple]) -> dict[str, Path]:
    """Render blocks to ``stem.md`` and ``stem.html``. Blocks: ("h", text), ("p", text),
    ("table", header, rows), ("img", caption, relative path)."""
    md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            md += [f"## {block[1]}", ""]
            body.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "p":
            md += [block[1], ""]
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            md += [_md_table(block[2], block[1]), ""]
            body.append(_html_table(block[2], block[1]))
        elif kind == "img":
            md += [f"![{block[1]}]({block[2]})", "", f"*{block[1]}*", ""]
            body.append(f'<figure><img src="{html.escape(block[2])}" alt="{html.escape(block[1])}">'
                        f"<figcaption>{html.escape(block[1])}</figcaption></figure>")
    paths = {"md": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(page)
    return paths


def write_report(report: dict, figures: dict[str, Path], out_dir: str | Path, title: str = "vqgen report",
                 stem: str = "report") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    ``figures`` maps captions to PNG paths (made relative to ``out_dir`` in the documents). Returns the
    paths written, by kind (``json``, ``md``, ``html``).
    """
    out_dir = Path(out_dir)
    save_json(report, out_dir / f"{stem}.json")
    blocks: list[tuple] = []
    if "run" in report:
        blocks.append(("p", f"Run: {report['run']}"))
    for section, about in SECTIONS.items():
        if section not in report:
            continue
        blocks += [("h", section), ("p", about)]
        rows = [[k, format_value(v)] for k, v in flatten(report[section]).items()]
        blocks.append(("table", ["metric", "value"], rows))
    if report.get("feature_spaces"):
        blocks += _feature_space_blocks(report["feature_spaces"])
    for note in report.get("notes", []):
        blocks.append(("p", f"Note: {note}"))
    if figures:
        blocks.append(("h", "figures"))
        for caption, path in figures.items():
            blocks.append(("img", caption, Path(path).resolve().relative_to(out_dir.resolve()).as_posix()))
    return {"json": out_dir / f"{stem}.json", **_write_docs(out_dir, stem, title, blocks)}


def _lookup(tree, dotted: str, missing=KeyError):
    """``tree["a"]["b"]`` for ``"a.b"``; ``missing`` where a part is absent (or a parent is not a dict)."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return missing
        tree = tree[part]
    return tree


def _feature_space_blocks(spaces: dict[str, dict]) -> list[tuple]:
    """A table (metric x feature space) of the FID-type numbers in every feature space, by name."""
    rows = []
    for label, key in SPACE_ROWS:
        values = [_lookup(space, key) for space in spaces.values()]
        if all(v is KeyError for v in values):
            continue
        cells = [format_value(None if v is KeyError else v) for v in values]
        if key.endswith("sha256"):
            cells = [cell[:16] for cell in cells]  # the first 16 hex digits tell weights apart
        rows.append([label, *cells])
    about = ("The FID-type metrics in every feature space, by name (the first column is the primary space, "
             "whose numbers also appear above). A label-free space was trained on the images without labels, "
             "so it also sees differences within a class; its k-NN accuracy checks it on held-out labels.")
    return [("h", "feature spaces"), ("p", about), ("table", ["metric"] + list(spaces), rows)]


# Columns of the comparison table (dotted report keys).
COMPARISON_KEYS = (
    "tokenizer.recon_mse", "tokenizer.psnr", "tokenizer.ssim", "tokenizer.rfid", "tokenizer.perplexity",
    "tokenizer.usage", "tokenizer.code_distance", "codebook.dead_codes", "codebook.spread.trace_ratio",
    "codebook.spread.effective_rank_codes", "generation.fid", "generation.kid", "generation.precision",
    "generation.recall", "generation.density", "generation.coverage", "generation.mode_coverage",
    "generation.token_perplexity", "generation.token_js",
    # how the samples were drawn: numbers from different settings are different experiments
    "generation.sampling.num_samples", "generation.sampling.cfg_scale", "generation.sampling.temperature",
    "generation.sampling.top_k", "generation.sampling.top_p", "generation.sampling.seed",
)


# Rows added to the comparison for every feature space that is not every run's primary one.
SPACE_COMPARISON_KEYS = ("rfid", "generation.fid", "generation.kid", "generation.precision", "generation.recall",
                         "generation.density", "generation.coverage")


def _extra_spaces(reports: dict[str, dict]) -> list[str]:
    """Names of the feature spaces in any report, except one that is the primary space of every run."""
    names = list(dict.fromkeys(n for r in reports.values() for n in (r.get("feature_spaces") or {})))
    primaries = {(r.get("feature_extractor") or {}).get("name") for r in reports.values()}
    return [n for n in names if primaries != {n}]


def write_comparison(reports: dict[str, dict], figures: dict[str, Path], out_dir: str | Path,
                     keys: tuple[str, ...] = COMPARISON_KEYS) -> dict[str, Path]:
    """One table (metrics x runs) plus figures, as ``comparison.{json,md,html}`` in ``out_dir``.

    Rows ``feature_spaces.NAME.*`` follow ``keys`` for the other feature spaces of the reports. Reports that
    used different feature extractor weights are flagged: their FID-type numbers are not comparable.
    """
    out_dir = Path(out_dir)
    flat = {name: flatten(r) for name, r in reports.items()}
    spaces = _extra_spaces(reports)
    keys = tuple(keys) + tuple(f"feature_spaces.{s}.{k}" for s in spaces for k in SPACE_COMPARISON_KEYS)
    table = {key: {name: f.get(key) for name, f in flat.items()} for key in keys}
    extractors = {name: f.get("feature_extractor.weights_sha256") for name, f in flat.items()}
    comparable = len(set(extractors.values())) <= 1
    space_extractors = {s: {name: f.get(f"feature_spaces.{s}.feature_extractor.weights_sha256")
                            for name, f in flat.items()} for s in spaces}
    save_json({"runs": {n: r.get("run") for n, r in reports.items()}, "table": table,
               "feature_extractors": extractors, "fid_comparable": comparable,
               "feature_space_extractors": space_extractors}, out_dir / "comparison.json")
    blocks: list[tuple] = [("h", "metrics")]
    rows = [[key] + [format_value(table[key][name]) for name in reports] for key in keys]
    blocks.append(("table", ["metric"] + list(reports), rows))
    if not comparable:
        blocks.append(("p", "Warning: the runs used different feature extractor weights; FID, KID, precision, "
                            "recall, density, coverage and mode coverage are not comparable between them."))
    for s, shas in space_extractors.items():
        if len({sha for sha in shas.values() if sha is not None}) > 1:
            blocks.append(("p", f"Warning: the runs used different weights for feature space {s!r}; its "
                                "feature_spaces rows are not comparable between them."))
    blocks.append(("table", ["run", "directory", "feature extractor sha256"],
                   [[n, str(r.get("run")), str(extractors[n])[:16]] for n, r in reports.items()]))
    if figures:
        blocks.append(("h", "figures"))
        for caption, path in figures.items():
            blocks.append(("img", caption, Path(path).resolve().relative_to(out_dir.resolve()).as_posix()))
    return {"json": out_dir / "comparison.json", **_write_docs(out_dir, "comparison", "vqgen comparison", blocks)}
