"""The fine-tuning rows of a scenario, queried by arm, task, budget and mode, and the arms the
report compares (the foundation model, its central counterpart, the baselines)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from sim.report.stats import Stat, mean_ci
from sim.results import POOLED_SITE, Arm, ArmKind, FinetuneMode, FinetuneRow

MODES = tuple(FinetuneMode)  # local, then federated


class FinetuneTable:
    """The rows with a finite headline value."""

    def __init__(self, rows: Iterable[FinetuneRow]) -> None:
        self.rows = [r for r in rows if r.value is not None]

    def _match(self, arm: str, task: str, budget: int, mode: FinetuneMode,
               site: str | None) -> list[FinetuneRow]:
        out = [r for r in self.rows if r.arm == arm and r.task == task and r.budget == budget
               and r.mode == mode]
        if site is not None:
            return [r for r in out if r.site == site]
        # local: one row per site; federated: the pooled evaluation over sites
        return [r for r in out if (r.site == POOLED_SITE) == (mode == FinetuneMode.federated)]

    def values(self, arm: str, task: str, budget: int, mode: FinetuneMode,
               site: str | None = None) -> list[float]:
        """Headline values over seeds (and over sites for mode local)."""
        return [r.value for r in self._match(arm, task, budget, mode, site) if r.value is not None]

    def stat(self, arm: str, task: str, budget: int, mode: FinetuneMode,
             site: str | None = None) -> Stat | None:
        return mean_ci(self.values(arm, task, budget, mode, site))

    def has(self, arm: str, task: str, budget: int, mode: FinetuneMode) -> bool:
        return bool(self._match(arm, task, budget, mode, None))

    def has_any(self, arm: str, task: str, budget: int) -> bool:
        return any(self.has(arm, task, budget, m) for m in MODES)

    def metric(self, task: str) -> str:
        """The task's headline metric as the rows name it."""
        for r in self.rows:
            if r.task == task and r.metric:
                return r.metric
        return "dice_mean" if task.endswith("_seg") else "value"

    def budgets(self, task: str | None = None) -> list[int]:
        """Budgets with rows, ascending, 0 ("all labelled subjects") last."""
        found = {r.budget for r in self.rows if task is None or r.task == task}
        return sorted(found, key=lambda b: (b == 0, b))

    def tasks(self, order: Sequence[str] = ()) -> list[str]:
        present = {r.task for r in self.rows}
        return [t for t in order if t in present] + sorted(present - set(order))

    def sites(self, order: Sequence[str] = ()) -> list[str]:
        present = {r.site for r in self.rows if r.site != POOLED_SITE}
        return [s for s in order if s in present] + sorted(present - set(order))

    def mean_of(self, arms: Sequence[Arm], task: str, budget: int, mode: FinetuneMode) -> float | None:
        """Mean over arms of each arm's mean (arms without rows in this mode are left out)."""
        means = [s.mean for a in arms if (s := self.stat(a.name, task, budget, mode)) is not None]
        return float(np.mean(means)) if means else None

    def common_mode(self, arms: Sequence[str], task: str, budget: int) -> FinetuneMode | None:
        """The fine-tuning mode every arm has rows for: federated first, then local."""
        for mode in (FinetuneMode.federated, FinetuneMode.local):
            if arms and all(self.has(a, task, budget, mode) for a in arms):
                return mode
        return None

    def preferred_mode(self, arm: str, task: str, budget: int) -> FinetuneMode:
        """Federated fine-tuning if the arm has it at this budget, else local."""
        return (FinetuneMode.federated if self.has(arm, task, budget, FinetuneMode.federated)
                else FinetuneMode.local)


def of_kind(arms: Sequence[Arm], kind: ArmKind) -> list[Arm]:
    return [a for a in arms if a.kind == kind]


def fm_arms(arms: Sequence[Arm]) -> list[Arm]:
    """The foundation-model arms: federated without DP (the first federated arm if all use DP)."""
    federated = of_kind(arms, ArmKind.federated)
    plain = [a for a in federated if not a.has_dp]
    return plain or federated[:1]


def central_for(fm: Arm, arms: Sequence[Arm]) -> Arm | None:
    """The central arm to compare ``fm`` with: same method if there is one, else the first."""
    central = of_kind(arms, ArmKind.central)
    same = [a for a in central if a.method == fm.method]
    return (same or central)[0] if central else None


def privacy_arms(arms: Sequence[Arm]) -> list[Arm]:
    """Federated arms placeable on an epsilon axis: DP with a number, or no DP (at infinity)."""
    return [a for a in of_kind(arms, ArmKind.federated) if not a.has_dp or a.epsilon is not None]
