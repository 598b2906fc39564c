"""How the report writes numbers, budgets, metrics and arms in words."""

from __future__ import annotations

from sim.report.stats import Stat, higher_is_better
from sim.results import Arm

METRIC_LABELS = {"dice_mean": "Dice", "balanced_accuracy": "balanced accuracy",
                 "landmark_error_mm": "landmark error"}
METHOD_LABELS = {"mae": "MAE", "dino": "DINO"}
MISSING = "–"


def budget_label(budget: int) -> str:
    """0 means every labelled subject a site has."""
    return "all" if int(budget) == 0 else str(int(budget))


def budget_phrase(budget: int) -> str:
    if int(budget) == 0:
        return "all labelled subjects"
    return f"{budget} labelled subject{'s' if budget != 1 else ''} per site"


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def unit(metric: str) -> str:
    return " mm" if metric.endswith("_mm") else ""


def fmt_value(value: float | None, metric: str = "") -> str:
    return MISSING if value is None else f"{value:.3f}{unit(metric)}"


def fmt_gap(gap: float | None, metric: str) -> str:
    return MISSING if gap is None else f"{gap:+.3f}{unit(metric)}"


def fmt_stat(stat: Stat | None) -> str:
    if stat is None:
        return MISSING
    if stat.low is None or stat.high is None:
        return f"{stat.mean:.3f} (n=1)"
    return f"{stat.mean:.3f} [{stat.low:.3f}, {stat.high:.3f}] (n={stat.n})"


def margin(fm: float, other: float, metric: str) -> str:
    """The raw difference FM - baseline, with the direction spelled out when lower is better."""
    diff = f"{fm - other:+.3f}{unit(metric)}"
    return diff if higher_is_better(metric) else f"{diff}; lower is better"


def fm_label(fm: Arm, several: bool) -> str:
    """'Federated MAE pretraining', with the arm's name when it needs telling apart."""
    method = fm.method.value if fm.method is not None else ""
    label = f"Federated {METHOD_LABELS.get(method, method)} pretraining".replace("  ", " ")
    return f"{label} ({fm.name})" if several or fm.has_dp else label
