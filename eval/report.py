"""Reports: ``report.json`` for machines, ``report.md`` and ``report.html`` (same content) for people.

A report is a nested dict of numbers (dotted names such as ``tokenizer.psnr`` are nested objects) plus
figures. :func:`write_report` renders one run; :func:`write_comparison` renders a table of several runs.
A report's ``feature_spaces`` (one entry per feature extractor, by name) is rendered as one table with a
column per space, so every FID-type number is shown under the name of the space it comes from; its
``caveats`` (:mod:`eval.caveats`) open the page.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from vqgen.core.io import atomic_path, save_json

__all__ = ["flatten", "format_value", "write_comparison", "write_report"]

# Sections of a run report, in display order, with a sentence saying what they show.
SECTIONS = {
    "protocol": "How these numbers were measured; numbers compare only with numbers measured the same way.",
    "images": "The images scored.",
    "reference": "What the samples are compared with.",
    "tokenizer": "Reconstruction of the evaluation split and codebook use by the tokenizer.",
    "codebook": "Shrinkage diagnostics: how the codes spread compared with the encoder outputs.",
    "generation": "Samples of the prior against the real split (FID-type metrics use the feature extractor below).",
    "feature_extractor": "Feature extractor behind FID, KID, precision/recall, density/coverage and mode coverage.",
}
# The headline numbers, in order: (dotted key, label).
HEADLINE = (
    ("tokenizer.rfid", "rFID"),
    ("tokenizer.psnr", "PSNR (dB)"),
    ("tokenizer.ssim", "SSIM"),
    ("tokenizer.usage", "codebook usage"),
    ("tokenizer.perplexity", "code perplexity"),
    ("generation.fid", "FID (samples)"),
    ("generation.kid", "KID"),
    ("generation.precision", "precision"),
    ("generation.recall", "recall"),
    ("generation.coverage", "coverage"),
    ("generation.mode_coverage", "mode coverage"),
)
# Labels of report keys (dotted, within their section); other keys are shown with "_" as spaces.
LABELS = {
    "tokenizer.recon_mse": "reconstruction MSE ([0, 1] scale)", "tokenizer.psnr": "PSNR (dB)",
    "tokenizer.ssim": "SSIM", "tokenizer.rfid": "rFID", "tokenizer.rkid": "rKID",
    "tokenizer.usage": "codebook usage (fraction of codes used)", "tokenizer.perplexity": "code perplexity",
    "tokenizer.code_distance": "mean pairwise code distance", "tokenizer.num_images": "images reconstructed",
    "codebook.dead_codes": "dead codes (never used)", "codebook.spread_over": "spread measured over",
    "codebook.spread.trace_ratio": "code spread / encoder-output spread (trace ratio)",
    "codebook.spread.effective_rank_codes": "effective rank of the codes",
    "codebook.spread.effective_rank_latents": "effective rank of the encoder outputs",
    "generation.fid": "FID", "generation.kid": "KID (mean)", "generation.kid_std": "KID (std over subsets)",
    "generation.num_samples": "samples scored", "generation.knn_images": "images per set for KID / k-NN metrics",
    "generation.mode_coverage": "mode coverage", "generation.token_js": "token JS divergence (samples vs data)",
    "generation.token_kl_samples_to_data": "token KL (samples to data)",
    "feature_extractor.weights_sha256": "weights sha256", "feature_extractor.weights_known": "published weights",
    "feature_extractor.torch_fidelity_name": "torch-fidelity name", "feature_extractor.feature_dim": "feature width",
    "protocol.num_samples": "samples the protocol scores", "protocol.num_samples_scored": "samples scored here",
    "protocol.knn_images": "images per set for KID / k-NN metrics",
    "reference.num_images": "images behind the statistics", "reference.knn_images": "images kept for KID / k-NN",
}
# Rows of the feature-space table: (label, dotted key inside report["feature_spaces"][name]).
SPACE_ROWS = (
    ("extractor", "feature_extractor.torch_fidelity_name"),
    ("label-free", "feature_extractor.label_free"),
    ("weights sha256", "feature_extractor.weights_sha256"),
    ("published weights", "feature_extractor.weights_known"),
    ("feature width", "feature_extractor.feature_dim"),
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
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "font-size:13px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "td:nth-child(n+2){font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eee}"
    "h3{font-size:15px;margin:1em 0 0.3em}"
    ".figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}"
    "figure{margin:0}figcaption{font-size:13px;color:#555}"
    ".caveats{background:#fff4e5;border-left:4px solid #e08a00;padding:0.5em 1em 0.5em 2em;margin:1em 0}"
    ".caveats li{margin:0.3em 0}.notes{color:#444;font-size:14px}details{margin:1em 0}"
)


def _write_docs(out_dir: Path, stem: str, title: str, blocks: list[tuple]) -> dict[str, Path]:
    """Render blocks to ``stem.md`` and ``stem.html``. Blocks: ("h", text), ("h3", text), ("p", text),
    ("table", header, rows), ("list", css class, items), ("img", caption, relative path),
    ("figures", [(caption, relative path)]), ("details", summary, blocks)."""
    md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
    _render(blocks, md, body)
    paths = {"md": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(page)
    return paths


def _figure(caption: str, rel: str, md: list[str], body: list[str]) -> None:
    md += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    body.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _render(blocks: list[tuple], md: list[str], body: list[str]) -> None:
    for block in blocks:
        kind = block[0]
        if kind == "h":
            md += [f"## {block[1]}", ""]
            body.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "h3":
            md += [f"### {block[1]}", ""]
            body.append(f"<h3>{html.escape(block[1])}</h3>")
        elif kind == "p":
            md += [block[1], ""]
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            md += [_md_table(block[2], block[1]), ""]
            body.append(_html_table(block[2], block[1]))
        elif kind == "list":
            md += [f"- {item}" for item in block[2]] + [""]
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block[2])
            body.append(f'<ul class="{block[1]}">{items}</ul>')
        elif kind == "img":
            _figure(block[1], block[2], md, body)
        elif kind == "figures":
            body.append('<div class="figures">')
            for caption, rel in block[1]:
                _figure(caption, rel, md, body)
            body.append("</div>")
        elif kind == "details":
            md += [f"**{block[1]}**", ""]
            body.append(f"<details><summary>{html.escape(block[1])}</summary>")
            _render(block[2], md, body)
            body.append("</details>")


def _label(section: str, key: str) -> str:
    return LABELS.get(f"{section}.{key}", key.replace("_", " "))


def _is_scalar(value) -> bool:
    """A value shown in one cell: not a mapping, and not a long or nested list."""
    return not isinstance(value, (dict, list)) or (isinstance(value, list) and len(value) <= 12
                                                    and all(not isinstance(v, (dict, list)) for v in value))


def _cell(key: str, value) -> str:
    text = format_value(value)
    return text[:16] + "..." if key.endswith("sha256") and isinstance(value, str) and len(value) > 16 else text


def _records(value) -> bool:
    """A mapping of mappings with scalar values (e.g. modes per factor): one table row per entry."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(v, dict) and v for v in value.values())
            and all(_is_scalar(x) for v in value.values() for x in v.values()))


def _mapping_blocks(title: str, section: str, tree: dict, first: bool = False) -> list[tuple]:
    """``tree`` as tables: its scalar values (labelled), a matrix for each mapping of records, and the other
    nested mappings recursively under their own headings; long lists are summarised."""
    rows = [[_label(section, k), _cell(k, v)] for k, v in tree.items() if _is_scalar(v)]
    blocks: list[tuple] = []
    if rows:
        blocks += ([] if first else [("h3", title)]) + [("table", ["quantity", "value"], rows)]
    for key, value in tree.items():
        name = f"{title}: {key.replace('_', ' ')}"
        if _records(value):
            columns = list(dict.fromkeys(c for v in value.values() for c in v))
            blocks += [("h3", name), ("table", [key.replace("_", " "), *[c.replace("_", " ") for c in columns]],
                                      [[str(k), *[_cell(c, v.get(c)) for c in columns]] for k, v in value.items()])]
        elif isinstance(value, dict) and value:
            blocks += _mapping_blocks(name, f"{section}.{key}", value)
        elif isinstance(value, list) and not _is_scalar(value):
            blocks.append(("p", f"{_label(section, key)}: {format_value(value)} (every value is in the JSON report)"))
    return blocks


def _section_blocks(section: str, tree: dict) -> list[tuple]:
    """A report section as tables (see :func:`_mapping_blocks`)."""
    return _mapping_blocks(section.replace("_", " "), section, tree, first=True)


def _headline_blocks(report: dict) -> list[tuple]:
    rows = [[label, format_value(value)] for key, label in HEADLINE
            if (value := _lookup(report, key, None)) is not None]
    if not rows:
        return []
    space = (report.get("feature_extractor") or {}).get("name")
    protocol = (report.get("protocol") or {}).get("name")
    about = "; ".join(part for part in (f"feature space: {space}" if space else "",
                                        f"protocol: {protocol}" if protocol else "") if part)
    return [("h", "summary"), ("table", ["metric", "value"], rows)] + ([("p", about[0].upper() + about[1:] + ".")]
                                                                       if about else [])


def write_report(report: dict, figures: dict[str, Path], out_dir: str | Path, title: str = "vqgen report",
                 stem: str = "report") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    The documents open with the caveats (``report["caveats"]``, see :mod:`eval.caveats`) and a summary of
    the headline numbers, then one table per section (labelled rows; nested mappings as tables of their own),
    the feature spaces side by side, the figures in a grid, the notes, and timing and provenance folded
    away. ``figures`` maps captions to PNG paths (made relative to ``out_dir`` in the documents). Returns the
    paths written, by kind (``json``, ``md``, ``html``).
    """
    out_dir = Path(out_dir)
    save_json(report, out_dir / f"{stem}.json")
    blocks: list[tuple] = []
    if "run" in report:
        blocks.append(("p", f"Run: {report['run']}"))
    if report.get("caveats"):
        blocks += [("h", "caveats"), ("list", "caveats", [c["message"] for c in report["caveats"]])]
    blocks += _headline_blocks(report)
    for section, about in SECTIONS.items():
        if isinstance(report.get(section), dict) and report[section]:
            blocks += [("h", section.replace("_", " ")), ("p", about), *_section_blocks(section, report[section])]
    if report.get("feature_spaces"):
        blocks += _feature_space_blocks(report["feature_spaces"])
    if figures:
        rel = [(caption, Path(path).resolve().relative_to(out_dir.resolve()).as_posix())
               for caption, path in figures.items()]
        blocks += [("h", "figures"), ("figures", rel)]
    if report.get("notes"):
        blocks += [("h", "notes"), ("list", "notes", [str(n) for n in report["notes"]])]
    folded = []
    if report.get("timing_seconds"):
        folded.append(("table", ["phase", "seconds"],
                       [[k, format_value(v)] for k, v in report["timing_seconds"].items()]))
    if report.get("provenance"):
        folded.append(("table", ["provenance", "value"],
                       [[k, format_value(v)] for k, v in flatten(report["provenance"]).items()]))
    if folded:
        blocks.append(("details", "timing and provenance", folded))
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
