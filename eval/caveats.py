"""Caveats: where a report's numbers mislead, said next to them.

:func:`report_caveats` reads a finished report (the dict of ``report.json``) and returns one entry per
problem, ``{"code", "metric", "message"}``:

- ``few_images``: FID / KID on fewer than :data:`MIN_UNBIASED_IMAGES` images are biased (FID grows as the
  count shrinks), so they compare only with numbers at the same count;
- ``handful``: rFID / FID on fewer than :data:`HANDFUL` images: the number says more about the count than
  about the images (either caveat adds when the count is below the feature dimension: a singular covariance);
- ``near_chance``: the feature extractor's own check (the offline classifier's held-out accuracy, the label-free
  backbone's k-NN accuracy) is near chance, so its features barely tell the images apart;
- ``unknown_weights``: a standard extractor (Inception, DINOv2) ran with weights other than the published file.
"""

from __future__ import annotations

__all__ = ["HANDFUL", "MIN_UNBIASED_IMAGES", "near_chance", "report_caveats"]

MIN_UNBIASED_IMAGES = 10_000
HANDFUL = 200
# An accuracy that closes less than this share of the gap from chance to 1 is "near chance".
NEAR_CHANCE_GAP = 0.2


def near_chance(accuracy: float, classes: int) -> bool:
    """True when ``accuracy`` on ``classes`` balanced classes is within 20 % of the way from chance to 1."""
    chance = 1.0 / max(int(classes), 1)
    return accuracy < chance + NEAR_CHANCE_GAP * (1.0 - chance)


def _count_caveats(metric: str, counts: dict[str, int | None], feature_dim: int | None) -> list[dict]:
    """Caveats for an FID-type ``metric`` computed from sets of ``counts`` images (name -> count)."""
    known = {k: int(v) for k, v in counts.items() if v}
    if not known:
        return []
    smallest_name, smallest = min(known.items(), key=lambda kv: kv[1])
    described = " and ".join(f"{v:,} {k}" for k, v in known.items())
    out = []
    singular = (f"; with fewer images than the {feature_dim} feature dimensions the covariance is singular"
                if feature_dim and smallest <= feature_dim else "")
    if smallest < HANDFUL:
        out.append({"code": "handful", "metric": metric,
                    "message": f"{metric} on a handful of images ({described}): the number mostly measures how few "
                               f"images there are, not how good they are; do not read it as a quality score{singular}"})
    elif smallest < MIN_UNBIASED_IMAGES:
        out.append({"code": "few_images", "metric": metric,
                    "message": f"{metric} on {described} images (fewer than {MIN_UNBIASED_IMAGES:,}): biased, compare "
                               f"only at equal counts{singular}"})
    return out


def _extractor_caveats(space: str, extractor: dict) -> list[dict]:
    out = []
    heads = {str(name): int(n) for name, n in (extractor.get("heads") or [])}
    accuracy = extractor.get("test_accuracy")
    if isinstance(accuracy, dict):
        weak = [(h, a, heads[h]) for h, a in accuracy.items() if h in heads and a is not None and near_chance(a, heads[h])]
        if weak:
            parts = ", ".join(f"{h}: {a:.2f} (chance {1 / n:.2f})" for h, a, n in weak)
            out.append({"code": "near_chance", "metric": space,
                        "message": f"the {space} extractor's held-out accuracy is near chance ({parts}): its features "
                                   "barely separate the images, so FID/KID/precision/recall in this space say little "
                                   "(a low FID may only mean the network sees every image alike); train it longer "
                                   "(classifier.max_steps) or use another extractor"})
    knn = extractor.get("knn_accuracy")
    classes = (extractor.get("knn") or {}).get("classes")
    if knn is not None and classes and near_chance(knn, classes):
        out.append({"code": "near_chance", "metric": space,
                    "message": f"the {space} extractor's k-NN check accuracy is near chance ({knn:.2f}, chance "
                               f"{1 / classes:.2f}): its features barely separate the images, so the numbers in this "
                               "space say little"})
    if extractor.get("weights_known") is False:
        out.append({"code": "unknown_weights", "metric": space,
                    "message": f"the {space} extractor ran with weights other than the published file (sha256 "
                               f"{str(extractor.get('weights_sha256'))[:16]}...): its numbers are not comparable "
                               "with papers'"})
    return out


def report_caveats(report: dict) -> list[dict]:
    """Every caveat of ``report`` (see the module docstring), in display order; empty when there is none."""
    spaces = report.get("feature_spaces") or {}
    if not spaces and report.get("feature_extractor"):
        spaces = {report["feature_extractor"].get("name", "primary"): {"feature_extractor": report["feature_extractor"]}}
    out: list[dict] = []
    first = next(iter(spaces.values()), {}).get("feature_extractor", {}) if spaces else {}
    dim = first.get("feature_dim")
    tokenizer, generation = report.get("tokenizer") or {}, report.get("generation") or {}
    if tokenizer.get("rfid") is not None:
        recon = first.get("num_reconstructions", tokenizer.get("num_images"))
        real = first.get("num_recon_reference", first.get("num_real_images"))
        out += _count_caveats("rFID", {"reconstructed": recon, "real": real}, dim)
    if generation.get("fid") is not None:
        fake = generation.get("num_samples")
        real = first.get("num_reference_images", first.get("num_real_images"))
        out += _count_caveats("FID/KID", {"generated": fake, "real": real}, dim)
    for name, space in spaces.items():
        out += _extractor_caveats(name, space.get("feature_extractor") or {})
    return out
