"""What the scenario found, in numbers and in plain sentences: the headline, where the FM does and
does not beat each baseline, and the fed/central ratios.

Every number is a mean over seeds (and, for site-local fine-tuning, over sites) of the rows'
headline values. Gaps are signed so that positive means the FM is better, and the fed/central
ratio is > 1 when the FM is better, whatever the metric's direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sim.report.stats import Stat, fm_ratio, higher_is_better, oriented_gap
from sim.report.table import FinetuneTable, central_for, fm_arms, of_kind
from sim.report.text import budget_label, budget_phrase, fm_label, fmt_value, margin, metric_label
from sim.results import Arm, ArmKind, FinetuneMode, ScenarioResults


def headline_task(results: ScenarioResults, table: FinetuneTable) -> str | None:
    """The first segmentation task with rows, else the first task with rows."""
    tasks = table.tasks(results.scenario.tasks)
    seg = [t for t in tasks if table.metric(t) == "dice_mean" or t.endswith("_seg")]
    return (seg or tasks)[0] if tasks else None


@dataclass(frozen=True)
class Headline:
    """The scenario's answer at the smallest budget of the headline task (None: no data)."""

    task: str | None = None
    budget: int | None = None
    metric: str | None = None
    higher_is_better: bool | None = None
    fm_arm: str | None = None
    mode: FinetuneMode | None = None
    fm: float | None = None
    scratch: float | None = None
    local: float | None = None  # mean over the local-only arms
    central: float | None = None
    unet: float | None = None  # the supervised U-Net
    gap_vs_scratch: float | None = None
    gap_vs_local: float | None = None
    gap_vs_unet: float | None = None
    fed_central_ratio: float | None = None


def headline(results: ScenarioResults) -> Headline:
    """The scenario's answer at the smallest budget, for the first segmentation task.

    All values come from one fine-tuning mode (federated when every compared arm has it, else
    local).
    """
    table, arms = FinetuneTable(results.finetune), results.arm_order()
    task = headline_task(results, table)
    fms = fm_arms(arms)
    if task is None or not fms:
        return Headline()
    budget, metric, fm = table.budgets(task)[0], table.metric(task), fms[0]
    central = central_for(fm, arms)
    groups = {"scratch": of_kind(arms, ArmKind.scratch)[:1], "local": of_kind(arms, ArmKind.local),
              "central": [central] if central else [], "unet": of_kind(arms, ArmKind.supervised)[:1]}
    present = [a.name for g in groups.values() for a in g if table.has_any(a.name, task, budget)]
    mode = table.common_mode([fm.name, *present], task, budget) or table.preferred_mode(fm.name, task, budget)
    fm_value = table.mean_of([fm], task, budget, mode)
    means = {key: table.mean_of(group, task, budget, mode) for key, group in groups.items()}
    gaps: dict[str, float | None] = {"scratch": None, "local": None, "unet": None}
    ratio = None
    if fm_value is not None:
        for key in gaps:
            if (other := means[key]) is not None:
                gaps[key] = oriented_gap(fm_value, other, metric)
        if (central_value := means["central"]) is not None:
            ratio = fm_ratio(fm_value, central_value, metric)
    return Headline(task=task, budget=budget, metric=metric, higher_is_better=higher_is_better(metric),
                    fm_arm=fm.name, mode=mode, fm=fm_value, scratch=means["scratch"],
                    local=means["local"], central=means["central"], unet=means["unet"],
                    gap_vs_scratch=gaps["scratch"], gap_vs_local=gaps["local"],
                    gap_vs_unet=gaps["unet"], fed_central_ratio=ratio)


@dataclass(frozen=True)
class Comparison:
    """FM against one baseline at one task and budget, in one fine-tuning mode."""

    task: str
    budget: int
    metric: str
    mode: FinetuneMode
    fm: float
    other: float

    @property
    def fm_better(self) -> bool:
        return oriented_gap(self.fm, self.other, self.metric) > 0


def compare(table: FinetuneTable, fm: Arm, baseline: Sequence[Arm], task: str,
            budget: int) -> Comparison | None:
    """FM vs the mean of ``baseline`` arms, in the mode they all share; None if they share none."""
    present = [a for a in baseline if table.has_any(a.name, task, budget)]
    mode = table.common_mode([fm.name] + [a.name for a in present], task, budget)
    if not present or mode is None:
        return None
    fm_value, other = table.mean_of([fm], task, budget, mode), table.mean_of(present, task, budget, mode)
    if fm_value is None or other is None:
        return None
    return Comparison(task, budget, table.metric(task), mode, fm_value, other)


def _loss_sentence(label: str, name: str, c: Comparison) -> str:
    metric = metric_label(c.metric)
    return (f"{label} does not beat {name} on {c.task} with {budget_phrase(c.budget)} "
            f"({c.mode} fine-tuning): {metric} {fmt_value(c.fm, c.metric)} vs "
            f"{fmt_value(c.other, c.metric)} ({margin(c.fm, c.other, c.metric)}).")


def _win_sentence(label: str, name: str, wins: list[Comparison], total: int) -> str:
    count = f"all {total}" if len(wins) == total else f"{len(wins)} of {total}"
    parts = [f"{c.task} at k={budget_label(c.budget)} ({margin(c.fm, c.other, c.metric)})"
             for c in wins]
    return f"{label} beats {name} on {count} task/budget pairs: {'; '.join(parts)}."


def plain_statements(results: ScenarioResults) -> list[str]:
    """Where each FM arm does and does not beat scratch and local-only pretraining, by how much.

    One sentence per task and budget where the FM is not better (ties count as not better), and
    one summary sentence per baseline for the pairs where it is. Local-only is the mean over the
    local-only arms.
    """
    table, arms = FinetuneTable(results.finetune), results.arm_order()
    fms = fm_arms(arms)
    if not table.rows:
        return ["No fine-tuning results: nothing to compare."]
    if not fms:
        return ["No federated arm: there is no foundation model to compare."]
    baselines = (("scratch", of_kind(arms, ArmKind.scratch)[:1]),
                 ("local-only pretraining", of_kind(arms, ArmKind.local)),
                 ("the supervised U-Net", of_kind(arms, ArmKind.supervised)[:1]))
    tasks = table.tasks(results.scenario.tasks)
    out = []
    for fm in fms:
        label = fm_label(fm, len(fms) > 1)
        for name, group in baselines:
            out += _statements_vs(table, label, name, fm, group, tasks)
    return out


def _statements_vs(table: FinetuneTable, label: str, name: str, fm: Arm, group: Sequence[Arm],
                   tasks: Sequence[str]) -> list[str]:
    if not group:
        return [f"No {name} arm in this scenario: {label} is not compared with {name}."]
    found = [c for t in tasks for b in table.budgets(t) if (c := compare(table, fm, group, t, b))]
    if not found:
        return [f"No task/budget has both {label} and {name} results in a shared mode."]
    out = [_loss_sentence(label, name, c) for c in found if not c.fm_better]
    wins = [c for c in found if c.fm_better]
    if wins:
        out.append(_win_sentence(label, name, wins, len(found)))
    return out


@dataclass(frozen=True)
class Ratio:
    task: str
    budget: int
    fm: str
    central: str
    mode: FinetuneMode
    value: float


def fed_central_ratios(table: FinetuneTable, arms: Sequence[Arm], tasks: Sequence[str]) -> list[Ratio]:
    """Per task, budget and FM arm: fed/central (central/fed for errors), in a shared mode."""
    out = []
    for fm in fm_arms(arms):
        central = central_for(fm, arms)
        if central is None:
            continue
        for task in tasks:
            for budget in table.budgets(task):
                c = compare(table, fm, [central], task, budget)
                if c and (r := fm_ratio(c.fm, c.other, c.metric)) is not None:
                    out.append(Ratio(task, budget, fm.name, central.name, c.mode, r))
    return out


def privacy_point(table: FinetuneTable, arm: Arm, task: str, budget: int) -> Stat | None:
    """The arm's headline at ``budget``: federated fine-tuning if it has it, else local."""
    return table.stat(arm.name, task, budget, table.preferred_mode(arm.name, task, budget))
