"""The wire contract: what server and nodes say to each other beyond the weights, and what a
node may say back. Both sides import it from here; it is plain data (no flwr, no torch).

Server -> node (fit/evaluate config): the resolved run config as YAML (the *plan*), the phase,
the task, the global round and the share of the whole run a round covers.

Node -> server: weights (NumPy arrays), an example count, and scalar metrics from a fixed
allow-list. Nothing else leaves a node: no strings, no header values, no per-image numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PLAN_KEY = "plan"
PHASE_KEY = "phase"  # PRETRAIN | FINETUNE
TASK_KEY = "task"
ROUND_KEY = "round"  # global round number, all phases
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
