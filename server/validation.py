"""Checks on each site's reply before it may enter the aggregate (rounds without SecAgg+).

A reply is excluded, with its reason logged and recorded, when its arrays do not match the
global model (count, shapes, dtypes), hold NaN or Inf, move further from the global weights than
``max_update_norm`` (L2 over all arrays), or claim an example count outside the configured range.
Then, against the round itself (from 3 replies that passed, so that one site cannot be the
median): an update further than ``norm_ratio`` times the median update norm is excluded, and a
claimed example count above ``examples_ratio`` times the median claim counts as that much (a
large hospital keeps a large, but not a dominating, weight). With ``n`` sites one site then
moves the weighted mean away from the others' by at most ``w * (norm_ratio + 1)`` median norms,
``w = examples_ratio / (examples_ratio + n - 1)`` when the others claim alike (n = 5 with the
defaults: w = 1/3, at most 1.33 median norms; FedAvg without these bounds: unbounded).

Under SecAgg+ the server only sees the masked sum; there each node clips its own update to
``max_update_norm`` before masking (see client.app) and the server checks the aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


MIN_REPLIES_FOR_MEDIAN = 3


@dataclass(frozen=True)
class UpdateBounds:
    max_update_norm: float
    min_examples: int
    max_examples: int
    norm_ratio: float = 3.0  # 0: no bound relative to the round's median norm
    examples_ratio: float = 2.0  # 0: no cap relative to the round's median claim


MB = 1024 * 1024


def size_limit_bytes(max_update_mb: float | None, global_arrays: Sequence[np.ndarray]) -> int:
    """The largest reply accepted: ``max_update_mb``, or the global model's size + 10 % + 1 MB
    (room for the serialisation's headers)."""
    if max_update_mb is not None:
        return int(max_update_mb * MB)
    return int(1.1 * sum(a.nbytes for a in global_arrays)) + MB


def size_problem(tensors: Sequence[bytes], limit: int) -> str | None:
    """A reply's serialised weights over ``limit`` bytes, checked before anything is decoded."""
    size = sum(len(t) for t in tensors)
    if size > limit:
        return (f"update of {size / MB:.1f} MB exceeds the limit of {limit / MB:.1f} MB "
                "(federation.max_update_mb)")
    return None


def update_problem(arrays: Sequence[np.ndarray], num_examples: int,
                   global_arrays: Sequence[np.ndarray], bounds: UpdateBounds) -> str | None:
    """Why this reply must not be aggregated, or None when it is fine."""
    if len(arrays) != len(global_arrays):
        return f"{len(arrays)} arrays instead of {len(global_arrays)}"
    for i, (a, g) in enumerate(zip(arrays, global_arrays, strict=True)):
        if a.shape != g.shape:
            return f"array {i} has shape {a.shape} instead of {g.shape}"
        if a.dtype != g.dtype:
            return f"array {i} has dtype {a.dtype} instead of {g.dtype}"
    if not all(np.isfinite(a).all() for a in arrays):
        return "non-finite values (NaN or Inf)"
    if not bounds.min_examples <= num_examples <= bounds.max_examples:
        return (f"num_examples={num_examples} outside [{bounds.min_examples}, "
                f"{bounds.max_examples}]")
    norm = update_norm(arrays, global_arrays)
    if norm > bounds.max_update_norm:
        return f"update norm {norm:.3g} exceeds federation.max_update_norm={bounds.max_update_norm:g}"
    return None


def update_norm(arrays: Sequence[np.ndarray], global_arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of (site weights - global weights) over all arrays, in float64."""
    total = 0.0
    for a, g in zip(arrays, global_arrays, strict=True):
        diff = a.astype(np.float64) - g.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return total**0.5


def norm_outliers(norms: dict[str, float], bounds: UpdateBounds) -> dict[str, str]:
    """Sites whose update norm exceeds ``norm_ratio`` x the round's median, with the reason."""
    if bounds.norm_ratio <= 0 or len(norms) < MIN_REPLIES_FOR_MEDIAN:
        return {}
    median = float(np.median(list(norms.values())))
    limit = bounds.norm_ratio * median
    return {name: (f"update norm {norm:.3g} exceeds {bounds.norm_ratio:g} x the round's median "
                   f"{median:.3g} (federation.max_update_norm_ratio)")
            for name, norm in norms.items() if norm > limit}


def capped_examples(claims: dict[str, int], bounds: UpdateBounds) -> dict[str, int]:
    """The example count each site counts with: at most ``examples_ratio`` x the median claim."""
    if bounds.examples_ratio <= 0 or len(claims) < MIN_REPLIES_FOR_MEDIAN:
        return dict(claims)
    cap = max(1, int(bounds.examples_ratio * float(np.median(list(claims.values())))))
    return {name: min(count, cap) for name, count in claims.items()}
