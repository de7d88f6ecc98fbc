"""Statistics for multi-seed studies: per-arm summaries, two-arm comparisons and claim verdicts.

Pure functions on lists of per-seed values. The rules are fixed before any data is seen and are the same
for every claim and data set:

- A comparison of a claimed-better arm against a baseline uses Welch's t-test (unequal variances) on the
  per-seed values and its 95% confidence interval for the difference of means. ``effect`` is oriented so
  that positive means "the claimed arm is better".
- ``reproduces``: p < 0.05 and the effect is positive. ``does not reproduce``: p < 0.05 and the effect is
  negative, or the whole 95% interval lies within the margin of equivalence (+-``margin``: no effect of a
  size that matters), so a precisely measured absence of an effect is not called inconclusive.
  Otherwise ``inconclusive`` (including fewer than two values on a side).
- Margins (the smallest effect of interest): 5% of the baseline's mean for unbounded metrics (MSE,
  perplexity, FID, distances), 0.05 absolute for fractions in [0, 1] (usage, recall, coverage, shares).
- Multiple comparisons: the tests of one study form a family declared before the runs (the claims of
  ``benchmarks/reproduce.py``); their p values are adjusted by Holm's step-down method (``holm``), and the
  verdicts use the adjusted p (``p_adjusted``), shown next to the raw one. The equivalence rule keeps the
  95% interval.
- Over several data sets (and over several baselines of one claim): the verdict they all share, else
  ``inconclusive``. The rule is symmetric: one data set that reproduces and one that is inconclusive give
  ``inconclusive``, exactly as one that does not reproduce and one that is inconclusive do.
- A verdict whose adjusted p lies in [0.01, 0.05) is *fragile* (``fragile``): it holds, but one unlucky seed
  could move it; such a comparison is flagged for more seeds rather than trusted as settled.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats as _st

__all__ = ["VERDICTS", "combine_verdicts", "compare_arms", "default_margin", "fragile", "holm", "summarize",
           "verdict"]

VERDICTS = ("reproduces", "does not reproduce", "inconclusive")
FRACTION_MARGIN = 0.05
RELATIVE_MARGIN = 0.05
ALPHA = 0.05
FRAGILE_BELOW = 0.01  # adjusted p in [FRAGILE_BELOW, ALPHA): a verdict that more seeds should confirm


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}`` of per-seed values; ``std`` is the sample std (ddof 1; 0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "values": vals}


def default_margin(baseline: Sequence[float], fraction: bool) -> float:
    """The margin of equivalence: 0.05 for fractions, else 5% of |baseline mean|."""
    if fraction:
        return FRACTION_MARGIN
    return RELATIVE_MARGIN * abs(sum(baseline) / len(baseline))


def compare_arms(claimed: Sequence[float], baseline: Sequence[float], lower_is_better: bool,
                 margin: float) -> dict:
    """Welch comparison of ``claimed`` (the arm a claim says is better) against ``baseline``.

    Returns ``effect`` (> 0: claimed arm better), ``ci`` (95% interval of ``effect``), ``p`` (two-sided),
    ``margin`` and ``verdict``.
    """
    a, b = [float(v) for v in claimed], [float(v) for v in baseline]
    sign = -1.0 if lower_is_better else 1.0
    effect = sign * (sum(a) / len(a) - sum(b) / len(b))
    out = {"effect": effect, "ci": None, "p": None, "margin": margin, "verdict": "inconclusive"}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = _st.tvar(a) / len(a), _st.tvar(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values within each arm: the sign decides, without a test
        out.update(ci=[effect, effect], p=0.0 if effect else 1.0)
    else:
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = float(_st.t.ppf(1 - ALPHA / 2, df)) * se
        out.update(ci=[effect - half, effect + half], p=float(2 * _st.t.sf(abs(effect) / se, df)))
    out["verdict"] = verdict(out)
    return out


def verdict(result: dict, p: float | None = None) -> str:
    """The verdict of one comparison (``effect``, ``ci``, ``margin``) at p value ``p`` (default: its own ``p``)."""
    p = result["p"] if p is None else p
    if p is None or result["ci"] is None:
        return "inconclusive"
    lo, hi = result["ci"]
    margin = result["margin"]
    if p < ALPHA and result["effect"] > 0:
        return "reproduces"
    if (p < ALPHA and result["effect"] < 0) or (-margin < lo and hi < margin):
        return "does not reproduce"
    return "inconclusive"


def fragile(p_adjusted: float | None) -> bool:
    """Whether a comparison's adjusted p is significant but only just (in [0.01, 0.05)): more seeds wanted."""
    return p_adjusted is not None and FRAGILE_BELOW <= p_adjusted < ALPHA


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p values (None: a test that could not be run, left out).

    Sorted ascending, the i-th smallest of m gets ``max_{j <= i} min(1, (m - j + 1) p_(j))``; the order of the
    input is kept.
    """
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict over data sets or baselines: the one they all share, else ``inconclusive`` (symmetric)."""
    if not verdicts:
        return "inconclusive"
    first = verdicts[0]
    return first if all(v == first for v in verdicts) else "inconclusive"
