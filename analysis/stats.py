"""Mean and 95 % confidence interval over seeds, and the cell text that shows them."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

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
