"""The statistics of the report: means with Student-t intervals, and the direction of a metric.

Metric direction follows ``shared_model.tasks.scoring.headline_metric``: landmark error (mm) is
lower is better, Dice and balanced accuracy higher is better. The direction is read from the
metric name carried in each row, so writing a report does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
LOWER_IS_BETTER = frozenset({"landmark_error_mm"})


@dataclass(frozen=True)
class Stat:
    """Mean of ``n`` values with a two-sided t-interval; low/high are None when n == 1."""

    mean: float
    low: float | None
    high: float | None
    n: int


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Stat | None:
    """Mean and Student-t confidence interval of the finite values; None when there are none."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1:
        return Stat(mean, None, None, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Stat(mean, mean - half, mean + half, int(x.size))


def higher_is_better(metric: str) -> bool:
    """Direction of a headline metric: errors and distances (mm) are lower is better."""
    return not (metric in LOWER_IS_BETTER or metric.endswith("_mm") or "error" in metric
                or "loss" in metric)


def oriented_gap(fm: float, other: float, metric: str) -> float:
    """fm - other, signed so that a positive gap means the FM is better."""
    return fm - other if higher_is_better(metric) else other - fm


def fm_ratio(fm: float, central: float, metric: str) -> float | None:
    """fed/central for higher-is-better metrics, central/fed otherwise: > 1 means FM better."""
    num, den = (fm, central) if higher_is_better(metric) else (central, fm)
    return None if den == 0 else num / den
