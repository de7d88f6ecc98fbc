"""Caveats where numbers mislead, and the report page that shows them first (tables, not flattened keys)."""

from __future__ import annotations

import pytest

from vqgen.eval.caveats import near_chance, report_caveats
from vqgen.eval.report import write_report


def _report(num_images=50_000, num_samples=50_000, real=50_000, accuracy=None, heads=None, knn=None, known=None,
            dim=2048) -> dict:
    extractor = {"name": "x", "feature_dim": dim, "num_real_images": real, "num_reconstructions": num_images}
    if accuracy is not None:
        extractor.update(test_accuracy=accuracy, heads=heads)
    if knn is not None:
        extractor.update(knn_accuracy=knn[0], knn={"classes": knn[1]})
    if known is not None:
        extractor.update(weights_known=known, weights_sha256="ab" * 32)
    return {"tokenizer": {"rfid": 1.0, "num_images": num_images},
            "generation": {"fid": 2.0, "num_samples": num_samples},
            "feature_extractor": extractor, "feature_spaces": {"x": {"feature_extractor": extractor}}}


def _codes(report: dict) -> list[tuple[str, str]]:
    return [(c["code"], c["metric"]) for c in report_caveats(report)]


def test_counts():
    assert _codes(_report()) == []
    few = report_caveats(_report(num_samples=5_000))
    assert [(c["code"], c["metric"]) for c in few] == [("few_images", "FID/KID")]
    assert "5,000 generated" in few[0]["message"] and "biased, compare only at equal counts" in few[0]["message"]
    # rFID on 2 images (the case): a handful, and the covariance of 2048-d features is singular
    handful = report_caveats(_report(num_images=2, real=2))
    assert [(c["code"], c["metric"]) for c in handful] == [("handful", "rFID"), ("handful", "FID/KID")]
    assert "singular" in handful[0]["message"]
    assert _codes(_report(num_images=300, real=300, dim=16))[0] == ("few_images", "rFID")
    inception_2k = report_caveats(_report(num_samples=2_000))[0]["message"]  # below 2048 dimensions
    assert "biased, compare only at equal counts" in inception_2k and "singular" in inception_2k


def test_extractor_checks():
    assert near_chance(0.16, 6) and near_chance(0.16, 10) and not near_chance(0.9, 10)
    assert near_chance(0.55, 2) and not near_chance(0.7, 2)
    weak = _report(accuracy={"label": 0.16, "shape": 0.95}, heads=[["label", 10], ["shape", 4]])
    caveats = report_caveats(weak)
    assert [c["code"] for c in caveats] == ["near_chance"]
    assert "label: 0.16 (chance 0.10)" in caveats[0]["message"] and "shape" not in caveats[0]["message"]
    assert _codes(_report(accuracy={"label": 0.9}, heads=[["label", 10]])) == []
    assert _codes(_report(knn=(0.12, 10))) == [("near_chance", "x")]
    assert _codes(_report(knn=(0.9, 10))) == []
    assert _codes(_report(known=False)) == [("unknown_weights", "x")]
    assert _codes(_report(known=True)) == []


def test_report_page_opens_with_caveats_and_shows_tables(tmp_path):
    report = _report(num_samples=2_000, accuracy={"label": 0.16}, heads=[["label", 10]])
    report["generation"].update(modes={"modes_total": 10, "per_factor": {
        "shape": {"modes_hit": 3, "mode_coverage": 0.75}, "colour": {"modes_hit": 6, "mode_coverage": 1.0}}})
    report["caveats"] = report_caveats(report)
    report["timing_seconds"] = {"plots": 1.5}
    paths = write_report(report, {}, tmp_path)
    page = paths["html"].read_text()
    md = paths["md"].read_text()
    assert page.index('class="caveats"') < page.index("<h2>summary</h2>") < page.index("<h2>tokenizer</h2>")
    assert "biased, compare only at equal counts" in page and "near chance" in page
    assert "| FID (samples) | 2 |" in md  # a labelled summary row, not "generation.fid"
    assert "generation.fid" not in md
    # nested records become one matrix: a row per factor, a column per quantity
    assert "| per factor | modes hit | mode coverage |" in md and "| colour | 6 | 1 |" in md
    assert "<details><summary>timing and provenance</summary>" in page


@pytest.mark.parametrize("count,expected", [(9_999, "few_images"), (10_000, None), (199, "handful")])
def test_threshold_edges(count, expected):
    codes = [c["code"] for c in report_caveats(_report(num_samples=count, dim=16))]
    assert codes == ([expected] if expected else [])
