"""Checks on each site's reply before it may enter the aggregate (rounds without SecAgg+).

A reply is excluded, with its reason logged and recorded, when its arrays do not match the
global model (count, shapes, dtypes), hold NaN or Inf, move further from the global weights than
``max_update_norm`` (L2 over all arrays), or claim an example count outside the configured range.
Under SecAgg+ the server only sees the masked sum; there the nodes check their own weights
against the clipping range before masking (see client.app).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UpdateBounds:
    max_update_norm: float
    min_examples: int
    max_examples: int


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
