"""Mean and 95 % confidence interval over seeds, paired differences to a reference, and the cell text.

Two intervals for a difference between a row and its reference (``paired_difference``,
``bootstrap_ppl_difference``): Student-t over per-seed differences when there are >= 2 seed
pairs, else a paired bootstrap over the evaluation windows of the one pair (perplexity only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Two-sided confidence level of every interval in the tables.
CONFIDENCE = 0.95


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` of the finite values: Student-t interval, ``t_{(1+c)/2, n-1} * s / sqrt(n)``.

    n = 1 gives a NaN half width (no spread to estimate); n = 0 gives NaN mean too.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    xs = [float(v) for v in values if v is not None and not pd.isna(v) and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan, 1
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def summarise(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per ``keys`` group: ``seeds`` (runs in the group) and ``{m}``, ``{m}_ci``, ``{m}_n`` per metric.

    Metrics missing from ``table`` come out as NaN with n = 0 (records that lack a field do not crash).
    """
    missing = [k for k in keys if k not in table.columns]
    if missing:
        raise ValueError(f"grouping columns {missing} are not in the table (columns: {sorted(table.columns)})")
    rows = []
    for group, part in table.groupby(list(keys), sort=False, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        row = dict(zip(keys, group))
        row["seeds"] = len(part)
        for m in metrics:
            mean, half, n = mean_ci(part[m]) if m in part.columns else (math.nan, math.nan, 0)
            row[m], row[f"{m}_ci"], row[f"{m}_n"] = mean, half, n
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "seeds", *[f"{m}{s}" for m in metrics for s in ("", "_ci", "_n")]])


def format_ci(mean: float, half: float, n: int, digits: int = 2, scale: float = 1.0) -> str:
    """``"12.34 ± 0.56"`` (n >= 2), ``"12.34 (n=1)"``, or ``"–"`` when nothing was measured."""
    if n == 0 or mean is None or pd.isna(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if n == 1 or pd.isna(half):
        return f"{text} (n=1)"
    return f"{text} ± {half * scale:.{digits}f}"


# ---- paired differences to a reference -------------------------------------------------------------

#: Resamples and generator seed of the paired bootstrap (fixed: the same records give the same interval).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Marks a difference whose 95 % interval excludes 0.
SIGNIFICANT = "†"


@dataclass(frozen=True)
class Delta:
    """A difference (row minus its reference) with its interval ``[lo, hi]``.

    ``source`` says where the interval comes from: ``"seeds"`` (Student-t over ``n`` per-seed
    differences), ``"windows"`` (paired bootstrap over ``n`` evaluation windows of one seed pair),
    or ``"none"`` (one pair and nothing to resample: no interval).
    """

    mean: float
    lo: float
    hi: float
    n: int
    source: str

    @property
    def significant(self) -> bool:
        """True when the interval exists and excludes 0."""
        return math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > 0 or self.hi < 0)


def paired_difference(values: Sequence[float], references: Sequence[float],
                      confidence: float = CONFIDENCE) -> Delta:
    """Mean of the per-pair differences ``values[i] - references[i]`` and its Student-t interval.

    The pairs share everything but the method (same model, seed, training tokens, evaluation
    tokens), so the seed-to-seed variation common to both cancels. One pair gives no interval.
    """
    if len(values) != len(references):
        raise ValueError(f"{len(values)} values but {len(references)} references to pair them with")
    mean, half, n = mean_ci([float(v) - float(r) for v, r in zip(values, references)], confidence)
    if n == 0:
        return Delta(math.nan, math.nan, math.nan, 0, "none")
    if n == 1:
        return Delta(mean, math.nan, math.nan, 1, "none")
    return Delta(mean, mean - half, mean + half, n, "seeds")


def bootstrap_ppl_difference(nll: Sequence[float], tokens: Sequence[int], ref_nll: Sequence[float],
                             ref_tokens: Sequence[int], *, resamples: int = BOOTSTRAP_RESAMPLES,
                             seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> Delta:
    """Per-token perplexity difference of two runs scored on the same windows, with a paired bootstrap interval.

    Perplexity is ``exp(sum NLL / sum tokens)`` over the windows; each resample draws the windows
    with replacement, the *same* windows for the run and its reference, and the interval is the
    percentile interval of the resampled differences (numpy PCG64 seeded with ``seed``, so it is
    deterministic). Windows are blocks of consecutive tokens scored with a fresh context, so this
    is a block bootstrap; windows of the same document are not independent, which the interval
    does not model. ValueError when the two runs were not scored on the same windows.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    a, r = np.asarray(nll, dtype=np.float64), np.asarray(ref_nll, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.int64)
    if not (len(a) == len(t) == len(r) == len(ref_tokens)) or not np.array_equal(t, np.asarray(ref_tokens)):
        raise ValueError("the two runs were not scored on the same windows (window token counts differ); "
                         "a paired bootstrap needs the same evaluation stream")
    if len(a) == 0 or t.sum() <= 0:
        raise ValueError("no scored windows to bootstrap")
    point = math.exp(a.sum() / t.sum()) - math.exp(r.sum() / t.sum())
    if len(a) < 2:
        return Delta(point, math.nan, math.nan, len(a), "none")
    rng = np.random.Generator(np.random.PCG64(seed))
    diffs = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(a))  # bounded memory for long evaluation streams
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(a), size=(stop - start, len(a)))
        toks = t[idx].sum(axis=1)
        diffs[start:stop] = np.exp(a[idx].sum(axis=1) / toks) - np.exp(r[idx].sum(axis=1) / toks)
    lo, hi = np.quantile(diffs, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Delta(point, float(lo), float(hi), len(a), "windows")


def format_delta(delta: Delta | None, digits: int = 2, scale: float = 1.0, reference: float = math.nan) -> str:
    """Cell text: ``"+1.23 ± 0.45 (+2.1 %) †"`` (seeds), ``"+1.23 [+0.80, +1.70] (+2.1 %) †"`` (bootstrap),
    ``"+1.23 (+2.1 %)"`` (one pair, no interval).

    The percentage is relative to the reference's mean; † marks an interval that excludes 0; "–" = no pair.
    """
    if delta is None or delta.n == 0 or not math.isfinite(delta.mean):
        return "–"
    text = f"{delta.mean * scale:+.{digits}f}"
    if delta.source == "seeds":
        text += f" ± {(delta.hi - delta.mean) * scale:.{digits}f}"
    elif delta.source == "windows":
        text += f" [{delta.lo * scale:+.{digits}f}, {delta.hi * scale:+.{digits}f}]"
    if math.isfinite(reference) and reference != 0:
        text += f" ({100 * delta.mean / abs(reference):+.1f} %)"
    return text + (f" {SIGNIFICANT}" if delta.significant else "")
