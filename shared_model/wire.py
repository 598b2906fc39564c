"""The wire contract: what server and nodes say to each other beyond the weights, and what a
node may say back. Both sides import it from here; it is plain data (no flwr, no torch).

Server -> node (fit/evaluate config): the resolved run config as YAML (the *plan*), the phase,
the task, the global round and the share of the whole run a round covers.

Node -> server: weights (NumPy arrays; under SecAgg+ the update, encoded as below), an example
count, and scalar metrics from a fixed allow-list. Nothing else leaves a node: no strings, no
header values, no per-image numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PLAN_KEY = "plan"
PHASE_KEY = "phase"  # PRETRAIN | FINETUNE
TASK_KEY = "task"
ROUND_KEY = "round"  # global round number, all phases
RUN_KEY = "run"  # the run's token: nodes key what they keep between its rounds by it
SPAN_START_KEY = "span_start"  # fraction of the phase done before this round
SPAN_END_KEY = "span_end"

PRETRAIN = "pretrain"
FINETUNE = "finetune"

ALLOWED_METRICS = frozenset({
    # identity of the reporting site within the federation (a number the consortium assigned)
    "site_index",
    # training
    "num_images", "num_samples", "steps", "images_seen", "seconds", "resumed_from",
    "loss_first", "loss_last", "loss_mean", "embed_std", "teacher_entropy", "rankme",
    "kl_to_center", "probe_dice",
    # sample-level DP bookkeeping
    "dp_epsilon", "dp_sample_rate", "dp_steps",
    # evaluation
    "samples", "accuracy", "balanced_accuracy", "auc", "dice_mean", "landmark_error_mm",
})
ALLOWED_METRIC_PREFIXES = ("dice_", "hd95_mm_", "error_mm_")


def is_allowed_metric(name: str) -> bool:
    return name in ALLOWED_METRICS or name.startswith(ALLOWED_METRIC_PREFIXES)


def outgoing_metrics(values: Mapping[str, object]) -> dict[str, float | int]:
    """Keep allow-listed finite numbers only; anything else never leaves the node."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if not is_allowed_metric(key) or isinstance(value, bool):
            continue
        if isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)) and np.isfinite(value):
            out[key] = float(value)
    return out


# ---------------------------------------------------------------- SecAgg+ update encoding
#
# Under SecAgg+ a node does not send its weights: Flower's SecAgg+ quantises every value
# within +-clipping_range, and trained weights leave any fixed range. It sends its update (its
# weights minus the round's global weights), clipped to the consortium's L2 bound, divided by
# the round's scale so that every value lies within the range; the server multiplies the
# unmasked mean by the scale and adds it to the global weights. Both numbers travel in the
# round's plan (fit config).

UPDATE_SCALE_KEY = "secagg_update_scale"  # real change per unit sent
UPDATE_NORM_KEY = "update_norm_bound"  # L2 bound of a site's update (federation.max_update_norm)


def update_scale(max_weight_change: float, clipping_range: float) -> float:
    """The scale that maps a change of ``max_weight_change`` onto SecAgg+'s clipping range."""
    return max_weight_change / clipping_range


@dataclass(frozen=True)
class EncodedUpdate:
    """What a node sends under SecAgg+, and how much it had to shrink its update."""

    arrays: list[np.ndarray]
    norm: float  # L2 norm of the raw update
    shrink: float  # factor applied (1.0: sent as it is)


def encode_update(local: Sequence[np.ndarray], global_arrays: Sequence[np.ndarray], scale: float,
                  norm_bound: float, clipping_range: float) -> EncodedUpdate:
    """(local - global), clipped to ``norm_bound`` in L2 and, should a single value still exceed
    ``scale * clipping_range``, shrunk as a whole until it fits (the direction is kept), then
    divided by ``scale``: every value lies within +-clipping_range."""
    if len(local) != len(global_arrays):
        raise ValueError(f"{len(local)} arrays to send against {len(global_arrays)} received")
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(g, dtype=np.float64)
             for a, g in zip(local, global_arrays, strict=True)]
    norm = float(np.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in diffs)))
    if not np.isfinite(norm):
        raise ValueError("the update holds NaN or Inf")
    shrink = min(1.0, norm_bound / norm) if norm > 0 else 1.0
    peak = max((float(np.abs(d).max()) for d in diffs if d.size), default=0.0) * shrink
    limit = scale * clipping_range
    if peak > limit:
        shrink *= limit / peak
    sent = [np.clip(d * (shrink / scale), -clipping_range, clipping_range).astype(np.float32)
            for d in diffs]
    return EncodedUpdate(sent, norm, shrink)


def decode_update(mean_sent: Sequence[np.ndarray], global_arrays: Sequence[np.ndarray],
                  scale: float) -> list[np.ndarray]:
    """The new global weights: global + scale * (the sites' weighted mean of what they sent)."""
    return [(np.asarray(g, dtype=np.float64) + scale * np.asarray(m, dtype=np.float64))
            .astype(np.asarray(g).dtype) for m, g in zip(mean_sent, global_arrays, strict=True)]
