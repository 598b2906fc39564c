"""The researcher's report of a simulation scenario: ``results.json`` -> report.md/.html + PNGs.

The question a scenario answers is whether federated self-supervised pretraining (the "FM") gives
better fine-tuned models than training from scratch or pretraining at each site alone, and how
close it comes to pooling all images centrally. The report leads with that answer in numbers and
in plain sentences, then shows the evidence: few-shot curves, fed/central ratio, privacy-utility,
per-site metrics, pretraining curves and example predictions.

Every number is computed here from the rows of ``results.json`` (schema version 1): means over
seeds (and, for site-local fine-tuning, over sites) with a 95 % Student-t interval. Metric
direction follows ``shared_model.tasks.scoring.headline_metric``: landmark error (mm) is lower is
better, Dice and balanced accuracy higher is better. The direction is read from the metric name
carried in each row, so writing a report does not import torch.

Plots use matplotlib's object API (``Figure``) with the Agg renderer: no display and no global
pyplot state. A section whose data are missing is skipped with one line that says why.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy import stats

from shared_model.labels import MASK_VALUES

RESULTS_FORMAT = "fedcmr-sim-results"
RESULTS_VERSION = 1
CONFIDENCE = 0.95
FED_MAE_ANCHOR = 0.955  # Fed-MAE / centralised MAE, Yan et al. 2023 (published anchor)
FED_CENTRAL_GOAL = 0.98  # FedCMR's goal for the same ratio
LOWER_IS_BETTER = frozenset({"landmark_error_mm"})
METRIC_LABELS = {"dice_mean": "Dice", "balanced_accuracy": "balanced accuracy",
                 "landmark_error_mm": "landmark error"}
METHOD_LABELS = {"mae": "MAE", "dino": "DINO"}
MODES = ("local", "federated")
DPI = 90
STRUCTURE_COLOURS = {"lv_blood": "#e41a1c", "lv_myo": "#4daf4a", "rv_blood": "#377eb8",
                     "la_blood": "#ff7f00", "ra_blood": "#984ea3", "scar": "#ffff33"}
STRUCTURE_NAMES = {value: name for name, value in MASK_VALUES.items()}


# ---------------------------------------------------------------------------- loading


def load_results(run_dir: Path) -> dict:
    """Read and check ``run_dir/results.json``; a wrong format or version says what to do."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json; run the scenario first "
                                "(fedcmr-sim) or pass results= to write_report")
    results = json.loads(path.read_text(encoding="utf-8"))
    check_results(results, str(path))
    return results


def check_results(results: dict, source: str = "results") -> None:
    """Refuse results written for another format or a newer schema than this report reads."""
    if not isinstance(results, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(results).__name__}")
    fmt, version = results.get("format", RESULTS_FORMAT), results.get("version", RESULTS_VERSION)
    if fmt != RESULTS_FORMAT:
        raise ValueError(f"{source}: format is {fmt!r}, expected {RESULTS_FORMAT!r}")
    if not isinstance(version, int) or version > RESULTS_VERSION:
        raise ValueError(f"{source}: schema version {version!r}; this report reads version "
                         f"{RESULTS_VERSION} — update fedcmr or re-run the scenario")


# ---------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One pretraining arm of the scenario (federated, local-only, central or scratch)."""

    name: str
    kind: str
    method: str | None = None
    dp_mode: str = "none"
    epsilon: float | None = None
    secagg: bool = False
    teacher: str | None = None

    @property
    def has_dp(self) -> bool:
        return self.dp_mode not in (None, "", "none")


def _guess_kind(name: str) -> str:
    """Kind from an arm's name, for arms the results list in rows but not under ``arms``."""
    for prefix, kind in (("fed", "federated"), ("local", "local"), ("central", "central"),
                         ("scratch", "scratch")):
        if name.startswith(prefix):
            return kind
    return "other"


def arms_of(results: dict) -> list[Arm]:
    """Every arm, in the scenario's order, then any that only appear in rows."""
    info = results.get("arms") or {}
    names = list(results.get("scenario", {}).get("arms") or [])
    names += [n for n in info if n not in names]
    for row in list(results.get("finetune") or []) + list(results.get("curves") or []):
        if row.get("arm") is not None and row["arm"] not in names:
            names.append(row["arm"])
    arms = []
    for name in names:
        meta = info.get(name) or {}
        eps = meta.get("epsilon")
        arms.append(Arm(name=name, kind=meta.get("kind") or _guess_kind(name),
                        method=meta.get("method"), dp_mode=meta.get("dp_mode") or "none",
                        epsilon=None if eps is None else float(eps),
                        secagg=bool(meta.get("secagg")), teacher=meta.get("teacher")))
    return arms


def _of_kind(arms: Sequence[Arm], kind: str) -> list[Arm]:
    return [a for a in arms if a.kind == kind]


def fm_arms(arms: Sequence[Arm]) -> list[Arm]:
    """The foundation-model arms: federated without DP (the first federated arm if all use DP)."""
    federated = _of_kind(arms, "federated")
    plain = [a for a in federated if not a.has_dp]
    return plain or federated[:1]


def central_for(fm: Arm, arms: Sequence[Arm]) -> Arm | None:
    """The central arm to compare ``fm`` with: same method if there is one, else the first."""
    central = _of_kind(arms, "central")
    same = [a for a in central if a.method == fm.method]
    return (same or central or [None])[0]


# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean of ``n`` values with a two-sided t-interval; low/high are None when n == 1."""

    mean: float
    low: float | None
    high: float | None
    n: int


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> Stat | None:
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


# ---------------------------------------------------------------------------- fine-tuning rows


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


class Finetune:
    """The fine-tuning rows of a scenario, queried by arm, task, budget and mode."""

    def __init__(self, rows: Iterable[dict]):
        self.rows = [dict(r, budget=int(r["budget"])) for r in rows
                     if _number(r.get("value")) is not None
                     and _number(r.get("budget")) is not None]

    def _match(self, arm: str, task: str, budget: int, mode: str, site: str | None) -> list[dict]:
        out = [r for r in self.rows if r.get("arm") == arm and r.get("task") == task
               and r["budget"] == budget and r.get("mode") == mode]
        if site is not None:
            return [r for r in out if r.get("site") == site]
        # local: one row per site; federated: the aggregate over sites
        return [r for r in out if (r.get("site") == "all") == (mode == "federated")]

    def values(self, arm: str, task: str, budget: int, mode: str,
               site: str | None = None) -> list[float]:
        """Headline values over seeds (and over sites for mode local)."""
        return [float(r["value"]) for r in self._match(arm, task, budget, mode, site)]

    def stat(self, arm: str, task: str, budget: int, mode: str,
             site: str | None = None) -> Stat | None:
        return mean_ci(self.values(arm, task, budget, mode, site))

    def has(self, arm: str, task: str, budget: int, mode: str) -> bool:
        return bool(self._match(arm, task, budget, mode, None))

    def metric(self, task: str) -> str:
        """The task's headline metric as the rows name it."""
        for r in self.rows:
            if r.get("task") == task and r.get("metric"):
                return str(r["metric"])
        return "dice_mean" if task.endswith("_seg") else "value"

    def budgets(self, task: str | None = None) -> list[int]:
        """Budgets with rows, ascending, 0 ("all labelled subjects") last."""
        found = {r["budget"] for r in self.rows if task is None or r.get("task") == task}
        return sorted(found, key=lambda b: (b == 0, b))

    def tasks(self, order: Sequence[str] = ()) -> list[str]:
        present = {r.get("task") for r in self.rows}
        tail = sorted(t for t in present if t not in order and t is not None)
        return [t for t in order if t in present] + tail

    def sites(self, order: Sequence[str] = ()) -> list[str]:
        present = {r.get("site") for r in self.rows if r.get("site") not in (None, "all")}
        return [s for s in order if s in present] + sorted(present - set(order))


def common_mode(table: Finetune, arms: Sequence[str], task: str, budget: int) -> str | None:
    """The fine-tuning mode every arm has rows for: federated first, then local."""
    for mode in ("federated", "local"):
        if arms and all(table.has(a, task, budget, mode) for a in arms):
            return mode
    return None


def budget_label(budget: int) -> str:
    """0 means every labelled subject a site has."""
    return "all" if int(budget) == 0 else str(int(budget))


def budget_phrase(budget: int) -> str:
    if int(budget) == 0:
        return "all labelled subjects"
    return f"{budget} labelled subject{'s' if budget != 1 else ''} per site"


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _unit(metric: str) -> str:
    return " mm" if metric.endswith("_mm") else ""


def _fmt(value: float | None, metric: str = "") -> str:
    return "–" if value is None else f"{value:.3f}{_unit(metric)}"


def _fmt_stat(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    if stat.low is None:
        return f"{stat.mean:.3f} (n=1)"
    return f"{stat.mean:.3f} [{stat.low:.3f}, {stat.high:.3f}] (n={stat.n})"


# ---------------------------------------------------------------------------- headline


def _scenario(results: dict) -> dict:
    return results.get("scenario") or {}


def headline_task(results: dict, table: Finetune) -> str | None:
    """The first segmentation task with rows, else the first task with rows."""
    tasks = table.tasks(_scenario(results).get("tasks") or ())
    seg = [t for t in tasks if table.metric(t) == "dice_mean" or t.endswith("_seg")]
    return (seg or tasks or [None])[0]


def _mean_of(table: Finetune, arms: Sequence[Arm], task: str, budget: int,
             mode: str) -> float | None:
    """Mean over arms of each arm's mean (arms without rows in this mode are left out)."""
    means = [s.mean for a in arms if (s := table.stat(a.name, task, budget, mode)) is not None]
    return float(np.mean(means)) if means else None


def headline(results: dict) -> dict:
    """The scenario's answer at the smallest budget, for the first segmentation task.

    All values come from one fine-tuning mode (federated when every compared arm has it, else
    local); gaps are signed so that positive means the FM is better, and the fed/central ratio
    is > 1 when the FM is better, whatever the metric's direction.
    """
    table, arms = Finetune(results.get("finetune") or []), arms_of(results)
    task = headline_task(results, table)
    out: dict[str, Any] = dict.fromkeys(
        ("task", "budget", "metric", "higher_is_better", "fm_arm", "mode", "fm", "scratch",
         "local", "central", "gap_vs_scratch", "gap_vs_local", "fed_central_ratio"))
    fms = fm_arms(arms)
    if task is None or not fms:
        return out
    budget, metric, fm = table.budgets(task)[0], table.metric(task), fms[0]
    groups = {"scratch": _of_kind(arms, "scratch")[:1], "local": _of_kind(arms, "local"),
              "central": [c] if (c := central_for(fm, arms)) else []}
    present = [a.name for g in groups.values() for a in g if _has_any(table, a.name, task, budget)]
    mode = common_mode(table, [fm.name] + present, task, budget) or (
        "federated" if table.has(fm.name, task, budget, "federated") else "local")
    out.update(task=task, budget=budget, metric=metric, higher_is_better=higher_is_better(metric),
               fm_arm=fm.name, mode=mode, fm=_mean_of(table, [fm], task, budget, mode))
    for key, group in groups.items():
        out[key] = _mean_of(table, group, task, budget, mode)
    if out["fm"] is not None:
        for key in ("scratch", "local"):
            if out[key] is not None:
                out[f"gap_vs_{key}"] = oriented_gap(out["fm"], out[key], metric)
        if out["central"] is not None:
            out["fed_central_ratio"] = fm_ratio(out["fm"], out["central"], metric)
    return out


def _has_any(table: Finetune, arm: str, task: str, budget: int) -> bool:
    return any(table.has(arm, task, budget, m) for m in MODES)


# ---------------------------------------------------------------------------- plain statements


def _fm_label(fm: Arm, several: bool) -> str:
    method = METHOD_LABELS.get(fm.method or "", fm.method or "")
    label = f"Federated {method} pretraining".replace("  ", " ")
    return f"{label} ({fm.name})" if several or fm.has_dp else label


def _margin(fm: float, other: float, metric: str) -> str:
    """The raw difference FM - baseline, with the direction spelled out when lower is better."""
    diff = f"{fm - other:+.3f}{_unit(metric)}"
    return diff if higher_is_better(metric) else f"{diff}; lower is better"


@dataclass(frozen=True)
class Comparison:
    """FM against one baseline at one task and budget, in one fine-tuning mode."""

    task: str
    budget: int
    metric: str
    mode: str
    fm: float
    other: float

    @property
    def fm_better(self) -> bool:
        return oriented_gap(self.fm, self.other, self.metric) > 0


def compare(table: Finetune, fm: Arm, baseline: Sequence[Arm], task: str,
            budget: int) -> Comparison | None:
    """FM vs the mean of ``baseline`` arms, in the mode they all share; None if they share none."""
    present = [a for a in baseline if _has_any(table, a.name, task, budget)]
    mode = common_mode(table, [fm.name] + [a.name for a in present], task, budget)
    if not present or mode is None:
        return None
    fm_value, other = _mean_of(table, [fm], task, budget, mode), \
        _mean_of(table, present, task, budget, mode)
    return Comparison(task, budget, table.metric(task), mode, fm_value, other)


def _loss_sentence(label: str, name: str, c: Comparison) -> str:
    metric = metric_label(c.metric)
    return (f"{label} does not beat {name} on {c.task} with {budget_phrase(c.budget)} "
            f"({c.mode} fine-tuning): {metric} {_fmt(c.fm, c.metric)} vs "
            f"{_fmt(c.other, c.metric)} ({_margin(c.fm, c.other, c.metric)}).")


def _win_sentence(label: str, name: str, wins: list[Comparison], total: int) -> str:
    count = f"all {total}" if len(wins) == total else f"{len(wins)} of {total}"
    parts = [f"{c.task} at k={budget_label(c.budget)} ({_margin(c.fm, c.other, c.metric)})"
             for c in wins]
    return f"{label} beats {name} on {count} task/budget pairs: {'; '.join(parts)}."


def plain_statements(results: dict) -> list[str]:
    """Where each FM arm does and does not beat scratch and local-only pretraining, by how much.

    One sentence per task and budget where the FM is not better (ties count as not better), and
    one summary sentence per baseline for the pairs where it is. Local-only is the mean over the
    local-only arms.
    """
    table, arms = Finetune(results.get("finetune") or []), arms_of(results)
    fms = fm_arms(arms)
    if not table.rows:
        return ["No fine-tuning results: nothing to compare."]
    if not fms:
        return ["No federated arm: there is no foundation model to compare."]
    baselines = (("scratch", _of_kind(arms, "scratch")[:1]),
                 ("local-only pretraining", _of_kind(arms, "local")))
    tasks = table.tasks(_scenario(results).get("tasks") or ())
    out = []
    for fm in fms:
        label = _fm_label(fm, len(fms) > 1)
        for name, group in baselines:
            out += _statements_vs(table, label, name, fm, group, tasks)
    return out


def _statements_vs(table: Finetune, label: str, name: str, fm: Arm, group: Sequence[Arm],
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


# ---------------------------------------------------------------------------- plot helpers


def _colours(arms: Sequence[Arm]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {a.name: cmap(i % 10) for i, a in enumerate(arms)}


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    """A figure with ``n`` panels, up to three per row; unused panels hidden."""
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _safe_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts)


def _axis_label(metric: str) -> str:
    arrow = "↑" if higher_is_better(metric) else "↓"
    return f"{metric_label(metric)}{_unit(metric)} ({arrow} better)"


def _errorbar(ax, x: float, stat: Stat, **kwargs) -> None:  # noqa: ANN001 - matplotlib Axes
    """A point with its CI as an error bar; a bare point when there is no interval."""
    ax.errorbar([x], [stat.mean], yerr=_yerr(stat), capsize=3, **kwargs)


def _yerr(stat: Stat) -> list | None:
    """matplotlib's asymmetric error bar for one point; None when there is no interval."""
    return None if stat.low is None else [[stat.mean - stat.low], [stat.high - stat.mean]]


# ---------------------------------------------------------------------------- few-shot curves


def plot_few_shot(table: Finetune, arms: Sequence[Arm], task: str, path: Path) -> Path:
    """One line per arm over label budgets, 95 % CI band, one panel per fine-tuning mode."""
    budgets, metric, colours = table.budgets(task), table.metric(task), _colours(arms)
    modes = [m for m in MODES if any(table.has(a.name, task, b, m) for a in arms for b in budgets)]
    fig, axes = _grid(len(modes))
    for ax, mode in zip(axes, modes):
        for arm in arms:
            _few_shot_line(ax, table, arm.name, task, budgets, mode, colours[arm.name])
        ax.set_xticks(range(len(budgets)), [budget_label(b) for b in budgets])
        ax.set(title=f"{task} — {mode} fine-tuning", xlabel="labelled subjects per site",
               ylabel=_axis_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _few_shot_line(ax, table: Finetune, arm: str, task: str, budgets: Sequence[int],  # noqa: ANN001
                   mode: str, colour: Any) -> None:
    points = [(i, s) for i, b in enumerate(budgets) if (s := table.stat(arm, task, b, mode))]
    if not points:
        return
    x = [i for i, _ in points]
    ax.plot(x, [s.mean for _, s in points], marker="o", color=colour, label=arm)
    band = [(i, s) for i, s in points if s.low is not None]
    if band:
        ax.fill_between([i for i, _ in band], [s.low for _, s in band],
                        [s.high for _, s in band], color=colour, alpha=0.2)


def few_shot_table(table: Finetune, arms: Sequence[Arm], task: str) -> list[str]:
    """Markdown: arm x budget, mean [95 % CI] (n), one table per mode with rows."""
    budgets, lines = table.budgets(task), []
    for mode in MODES:
        rows = [[a.name] + [_fmt_stat(table.stat(a.name, task, b, mode)) for b in budgets]
                for a in arms if any(table.has(a.name, task, b, mode) for b in budgets)]
        if rows:
            lines += [f"*{mode} fine-tuning, {metric_label(table.metric(task))}:*", ""]
            lines += _md_table(["arm"] + [f"k={budget_label(b)}" for b in budgets], rows) + [""]
    return lines


# ---------------------------------------------------------------------------- fed / central


@dataclass(frozen=True)
class Ratio:
    task: str
    budget: int
    fm: str
    central: str
    mode: str
    value: float


def fed_central_ratios(table: Finetune, arms: Sequence[Arm], tasks: Sequence[str]) -> list[Ratio]:
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


def plot_ratios(ratios: Sequence[Ratio], arms: Sequence[Arm], path: Path) -> Path:
    """Bars per task and budget (one per FM arm); lines at parity, the anchor and the goal."""
    groups = list(dict.fromkeys((r.task, r.budget) for r in ratios))
    fm_names = list(dict.fromkeys(r.fm for r in ratios))
    colours, width = _colours(arms), 0.8 / len(fm_names)
    fig = Figure(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for j, name in enumerate(fm_names):
        xs = [(groups.index((r.task, r.budget)) + (j - (len(fm_names) - 1) / 2) * width, r.value)
              for r in ratios if r.fm == name]
        ax.bar([x for x, _ in xs], [v for _, v in xs], width, color=colours[name], label=name)
    ax.axhline(1.0, color="black", lw=1, label="parity (1.0)")
    ax.axhline(FED_MAE_ANCHOR, color="grey", ls="--", lw=1,
               label=f"Fed-MAE anchor {FED_MAE_ANCHOR}")
    ax.axhline(FED_CENTRAL_GOAL, color="tab:green", ls=":", lw=1.5,
               label=f"goal {FED_CENTRAL_GOAL}")
    ax.set_xticks(range(len(groups)), [f"{t}\nk={budget_label(b)}" for t, b in groups], fontsize=7)
    values = [r.value for r in ratios] + [FED_MAE_ANCHOR, 1.0]
    ax.set_ylim(min(values) - 0.05, max(values) + 0.05)
    ax.set(ylabel="federated / central (> 1: FM better)", title="Fed/central ratio")
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------- privacy-utility


def _privacy_point(table: Finetune, arm: Arm, task: str, budget: int) -> Stat | None:
    """The arm's headline at ``budget``: federated fine-tuning if it has it, else local."""
    mode = "federated" if table.has(arm.name, task, budget, "federated") else "local"
    return table.stat(arm.name, task, budget, mode)


def privacy_arms(arms: Sequence[Arm]) -> list[Arm]:
    """Federated arms placeable on an epsilon axis: DP with a number, or no DP (at infinity)."""
    return [a for a in _of_kind(arms, "federated") if not a.has_dp or a.epsilon is not None]


def plot_privacy(table: Finetune, arms: Sequence[Arm], tasks: Sequence[str], path: Path) -> Path:
    """Metric vs epsilon per task at the smallest budget; no-DP arms at 'no DP' on the right."""
    fed = privacy_arms(arms)
    finite = sorted({a.epsilon for a in fed if a.has_dp})
    x_inf = finite[-1] * 4
    colours = _colours(arms)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        budget = table.budgets(task)[0]
        for series in _dp_series(fed):
            pts = [(a.epsilon if a.has_dp else x_inf, s) for a in series
                   if (s := _privacy_point(table, a, task, budget))]
            ax.plot([x for x, _ in pts], [s.mean for _, s in pts], color="grey", lw=0.8)
        for arm in fed:
            if stat := _privacy_point(table, arm, task, budget):
                _errorbar(ax, arm.epsilon if arm.has_dp else x_inf, stat, color=colours[arm.name],
                          marker="o", label=arm.name)
        _scratch_line(ax, table, arms, task, budget)
        ax.set_xscale("log")
        ax.set_xticks(finite + [x_inf], [f"{e:g}" for e in finite] + ["∞\n(no DP)"])
        ax.minorticks_off()
        ax.set(title=f"{task}, k={budget_label(budget)}", xlabel="ε", ylabel=_axis_label(
            table.metric(task)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _dp_series(fed: Sequence[Arm]) -> list[list[Arm]]:
    """DP arms grouped by (method, dp_mode), by epsilon, ending at the method's no-DP arm."""
    out = []
    for key in dict.fromkeys((a.method, a.dp_mode) for a in fed if a.has_dp):
        series = sorted((a for a in fed if a.has_dp and (a.method, a.dp_mode) == key),
                        key=lambda a: a.epsilon)
        plain = [a for a in fed if not a.has_dp and a.method == key[0]]
        out.append(series + plain[:1])
    return out


def _scratch_line(ax, table: Finetune, arms: Sequence[Arm], task: str,  # noqa: ANN001
                  budget: int) -> None:
    for arm in _of_kind(arms, "scratch")[:1]:
        if stat := _privacy_point(table, arm, task, budget):
            ax.axhline(stat.mean, color="black", ls=":", lw=1, label=f"{arm.name}")


def privacy_table(table: Finetune, arms: Sequence[Arm], tasks: Sequence[str]) -> list[str]:
    rows = []
    for arm in privacy_arms(arms):
        cells = [_fmt_stat(_privacy_point(table, arm, t, table.budgets(t)[0])) for t in tasks]
        eps = f"{arm.epsilon:g}" if arm.has_dp else "∞ (no DP)"
        rows.append([arm.name, arm.dp_mode, eps, "yes" if arm.secagg else "no"] + cells)
    heads = [f"{t} (k={budget_label(table.budgets(t)[0])})" for t in tasks]
    return _md_table(["arm", "DP", "ε", "SecAgg+"] + heads, rows)


# ---------------------------------------------------------------------------- per site


def plot_per_site(table: Finetune, arms: Sequence[Arm], tasks: Sequence[str],
                  sites: Sequence[str], path: Path) -> Path:
    """Grouped bars: site x arm at the task's smallest budget, site-local fine-tuning."""
    colours = _colours(arms)
    fig, axes = _grid(len(tasks), width=max(4.2, 1.1 * len(sites) + 1.5))
    for ax, task in zip(axes, tasks):
        budget = table.budgets(task)[0]
        shown = [a for a in arms if table.has(a.name, task, budget, "local")]
        width = 0.8 / max(len(shown), 1)
        for j, arm in enumerate(shown):
            for i, site in enumerate(sites):
                stat = table.stat(arm.name, task, budget, "local", site=site)
                if stat is None:
                    continue
                x = i + (j - (len(shown) - 1) / 2) * width
                ax.bar([x], [stat.mean], width, yerr=_yerr(stat), capsize=2,
                       color=colours[arm.name], label=arm.name if i == 0 else None)
        ax.set_xticks(range(len(sites)), sites, fontsize=7)
        ax.set(title=f"{task}, k={budget_label(budget)}, local fine-tuning",
               ylabel=_axis_label(table.metric(task)))
    _figure_legend(fig, axes)
    return _save(fig, path)


def _figure_legend(fig: Figure, axes: Sequence) -> None:
    """One legend under all panels, so it never hides a bar."""
    labelled: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="outside lower center",
                   ncols=min(len(labelled), 6), fontsize=7)


# ---------------------------------------------------------------------------- training curves


def curve_lines(curves: Sequence[dict], arms: Sequence[Arm], key: str) -> dict[str, list]:
    """Label -> [(round, value)]: site "all" for federated/central arms, each site for local."""
    out: dict[str, list] = {}
    for arm in arms:
        rows = [r for r in curves if r.get("arm") == arm.name and _number(r.get(key)) is not None]
        if arm.kind != "local":
            pooled = [r for r in rows if r.get("site") == "all"]
            rows = [dict(r, site="all") for r in pooled] if pooled else rows
        for site in dict.fromkeys(r.get("site") for r in rows):
            label = arm.name if site == "all" else f"{arm.name} {site}"
            pts = sorted((int(r["round"]), float(r[key])) for r in rows if r.get("site") == site)
            out[label] = pts
    return out


def _site_style(site: str) -> Any:
    """Solid for a pooled curve; a distinct dash pattern per site for local-only arms."""
    if not site:
        return "-"
    index = int(m.group()) if (m := re.search(r"\d+", site)) else len(site)
    return ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))][index % 4]


def plot_training(curves: Sequence[dict], arms: Sequence[Arm], path: Path) -> Path:
    """Pretraining loss per round per arm (and embedding std, the collapse monitor, if logged)."""
    keys = [k for k in ("loss", "embed_std") if curve_lines(curves, arms, k)]
    colours = _colours(arms)
    fig, axes = _grid(len(keys), width=5.0)
    for ax, key in zip(axes, keys):
        for label, pts in curve_lines(curves, arms, key).items():
            arm, _, site = label.partition(" ")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label,
                    color=colours.get(arm), ls=_site_style(site), lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel=key, title=f"pretraining {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


# ---------------------------------------------------------------------------- overlays


def dice_per_structure(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice per mask value present in either mask (background excluded)."""
    out = {}
    for value in sorted((set(np.unique(true).tolist()) | set(np.unique(pred).tolist())) - {0}):
        t, p = true == value, pred == value
        out[STRUCTURE_NAMES.get(int(value), f"label {value}")] = \
            float(2 * (t & p).sum() / (t.sum() + p.sum()))
    return out


def landmark_errors_mm(true: np.ndarray, pred: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Euclidean error per landmark in mm; NaN where either point is missing (non-finite)."""
    spacing = np.asarray(spacing_mm, dtype=float).reshape(-1)
    return np.sqrt((((pred - true) * spacing) ** 2).sum(axis=1))


def load_overlay(path: Path) -> dict[str, np.ndarray]:
    """An overlay file's arrays; never unpickles (a corrupt or pickled file is refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def plot_overlay(entry: dict, arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Image with true (solid) vs predicted (dashed) contours, or true vs predicted landmarks."""
    fig = Figure(figsize=(4.6, 4.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.asarray(arrays["image"], dtype=float), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    where = f"{entry.get('task')} — {entry.get('arm')} — {entry.get('site')}"
    if "true_mask" in arrays and "pred_mask" in arrays:
        summary = _draw_masks(ax, arrays["true_mask"], arrays["pred_mask"])
    elif "true_points" in arrays and "pred_points" in arrays:
        summary = _draw_points(ax, arrays)
    else:
        raise KeyError("neither true_mask/pred_mask nor true_points/pred_points")
    ax.set_title(f"{where}\n{summary}", fontsize=8)
    return _save(fig, path)


def _draw_masks(ax, true: np.ndarray, pred: np.ndarray) -> str:  # noqa: ANN001
    dice = dice_per_structure(true, pred)
    handles = []
    for name, score in dice.items():
        value, colour = MASK_VALUES.get(name), STRUCTURE_COLOURS.get(name, "white")
        for mask, style in ((true, "solid"), (pred, "dashed")):
            if value is not None and (mask == value).any():
                ax.contour(mask == value, levels=[0.5], colors=[colour], linestyles=style,
                           linewidths=1.2)
        handles.append(Line2D([], [], color=colour, label=f"{name} (Dice {score:.2f})"))
    handles += [Line2D([], [], color="white", ls="-", label="true"),
                Line2D([], [], color="white", ls="--", label="predicted")]
    ax.legend(handles=handles, fontsize=6, loc="lower right", facecolor="black", labelcolor="white")
    mean = np.mean(list(dice.values())) if dice else float("nan")
    return f"Dice {mean:.3f} (mean of {len(dice)} structures)"


def _draw_points(ax, arrays: dict[str, np.ndarray]) -> str:  # noqa: ANN001
    true = np.asarray(arrays["true_points"], dtype=float)
    pred = np.asarray(arrays["pred_points"], dtype=float)
    names = [str(n) for n in arrays.get("names", [])] or [f"#{i}" for i in range(len(true))]
    errors = landmark_errors_mm(true, pred, arrays.get("spacing_mm", 1.0))
    for (tr, tc), (pr, pc) in zip(true, pred):
        ax.plot([tc, pc], [tr, pr], color="yellow", lw=0.8)
    ax.scatter(true[:, 1], true[:, 0], marker="o", facecolors="none", edgecolors="lime",
               label="true")
    ax.scatter(pred[:, 1], pred[:, 0], marker="x", color="red", label="predicted")
    for name, (r, c), err in zip(names, true, errors):
        ax.annotate(f"{name} {err:.1f} mm", (c, r), fontsize=6, color="white",
                    xytext=(4, 4), textcoords="offset points")
    ax.legend(fontsize=6, loc="lower right")
    return f"mean landmark error {np.nanmean(errors):.2f} mm ({len(errors)} landmarks)"


# ---------------------------------------------------------------------------- markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _image(run_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


@dataclass
class Context:
    """What every section needs: the run folder, the rows, the arms and the task order."""

    run_dir: Path
    results: dict
    table: Finetune
    arms: list[Arm]
    tasks: list[str]

    @property
    def plots(self) -> Path:
        return self.run_dir / "plots"


def section_headline(ctx: Context) -> list[str]:
    h = headline(ctx.results)
    lines = ["## Headline", ""]
    if h["task"] is None or h["fm_arm"] is None:
        return lines + ["No fine-tuning results for a federated arm: no headline.", ""]
    metric = h["metric"]
    direction = "higher is better" if h["higher_is_better"] else "lower is better"
    rows = [["task", h["task"]], ["labelled subjects per site", budget_label(h["budget"])],
            ["metric", f"{metric} ({direction})"], ["fine-tuning mode", h["mode"]],
            [f"FM ({h['fm_arm']})", _fmt(h["fm"], metric)], ["scratch", _fmt(h["scratch"], metric)],
            ["local-only (mean of arms)", _fmt(h["local"], metric)],
            ["central", _fmt(h["central"], metric)],
            ["gap vs scratch (+ = FM better)", _fmt_gap(h["gap_vs_scratch"], metric)],
            ["gap vs local-only (+ = FM better)", _fmt_gap(h["gap_vs_local"], metric)],
            ["fed/central ratio (> 1 = FM better)", _fmt(h["fed_central_ratio"])]]
    return lines + _md_table(["", "value"], rows) + [""]


def _fmt_gap(gap: float | None, metric: str) -> str:
    return "–" if gap is None else f"{gap:+.3f}{_unit(metric)}"


def section_statements(ctx: Context) -> list[str]:
    lines = ["## Does federated pretraining help?", "",
             "Each comparison uses federated fine-tuning when both sides have it, else "
             "site-local fine-tuning (mean over sites and seeds).", ""]
    return lines + [f"- {s}" for s in plain_statements(ctx.results)] + [""]


def section_scenario(ctx: Context) -> list[str]:
    sc = _scenario(ctx.results)
    sites = [[s.get("name"), s.get("source"), s.get("vendor"), s.get("field_strength_t"),
              s.get("subjects")] for s in sc.get("sites") or []]
    lines = ["## Scenario", "", f"Name: `{sc.get('name', '?')}`; config: `{sc.get('config', '?')}`"
             " (resolved config and every number behind the plots: `results.json`).", ""]
    if sites:
        lines += _md_table(["site", "source", "vendor", "field strength (T)", "subjects"],
                           sites) + [""]
    budgets = ", ".join(budget_label(b) for b in sorted(sc.get("label_budgets") or [],
                                                        key=lambda b: (b == 0, b)))
    lines += [f"- tasks: {', '.join(sc.get('tasks') or ctx.tasks)}",
              f"- labelled subjects per site: {budgets or '–'}",
              f"- seeds: {', '.join(str(s) for s in sc.get('seeds') or []) or '–'}", ""]
    return lines + section_arms(ctx) + section_timings(ctx)


def section_arms(ctx: Context) -> list[str]:
    info = ctx.results.get("arms") or {}
    keys = ("rounds", "images_seen", "seconds")
    rows = [[a.name, a.kind, a.method or "–", "yes" if a.secagg else "no", a.dp_mode,
             "–" if a.epsilon is None else f"{a.epsilon:g}", a.teacher or "–"]
            + [(info.get(a.name) or {}).get(k, "–") for k in keys] for a in ctx.arms]
    header = ["arm", "kind", "method", "SecAgg+", "DP", "ε", "teacher", "rounds", "images seen",
              "seconds"]
    return _md_table(header, rows) + [""] if rows else ["No arms listed.", ""]


def section_timings(ctx: Context) -> list[str]:
    timings = ctx.results.get("timings_s") or {}
    if not timings:
        return ["No timings recorded.", ""]
    rows = [[stage, f"{float(s):.1f}"] for stage, s in timings.items() if _number(s) is not None]
    return ["Timings:", ""] + _md_table(["stage", "seconds"], rows) + [""]


def section_few_shot(ctx: Context) -> list[str]:
    lines = ["## Few-shot curves", ""]
    if not ctx.tasks:
        return lines + ["No fine-tuning results: no few-shot curves.", ""]
    for task in ctx.tasks:
        lines += [f"### {task}", ""]
        budgets = ctx.table.budgets(task)
        if len(budgets) < 2:
            lines += [f"Only one label budget (k={budget_label(budgets[0])}): no curve, "
                      "numbers below.", ""]
        else:
            path = plot_few_shot(ctx.table, ctx.arms, task,
                                 ctx.plots / f"few-shot-{_safe_name(task)}.png")
            lines += [_image(ctx.run_dir, path, f"few-shot {task}"), ""]
        lines += few_shot_table(ctx.table, ctx.arms, task)
    return lines


def section_ratio(ctx: Context) -> list[str]:
    lines = ["## Federated vs central", ""]
    ratios = fed_central_ratios(ctx.table, ctx.arms, ctx.tasks)
    if not ratios:
        return lines + ["No central arm with results to compare with: no fed/central ratio.", ""]
    path = plot_ratios(ratios, ctx.arms, ctx.plots / "fed-central-ratio.png")
    rows = [[r.task, budget_label(r.budget), r.fm, r.central, r.mode, f"{r.value:.3f}"]
            for r in ratios]
    return lines + [_image(ctx.run_dir, path, "fed/central ratio"), "",
                    f"Ratio > 1 means the FM is better (central/fed for landmark error). "
                    f"Published Fed-MAE anchor {FED_MAE_ANCHOR} (Yan et al. 2023); goal "
                    f"{FED_CENTRAL_GOAL}.", ""] + _md_table(
        ["task", "k", "FM arm", "central arm", "mode", "ratio"], rows) + [""]


def section_privacy(ctx: Context) -> list[str]:
    lines = ["## Privacy vs utility", ""]
    if not any(a.has_dp for a in privacy_arms(ctx.arms)) or not ctx.tasks:
        return lines + ["No DP arms with an ε in this scenario: no privacy-utility plot.", ""]
    path = plot_privacy(ctx.table, ctx.arms, ctx.tasks, ctx.plots / "privacy-utility.png")
    lines += [_image(ctx.run_dir, path, "privacy-utility"), "",
              "Smallest budget per task; federated fine-tuning where the arm has it, "
              "else local. Dotted line: scratch.", ""]
    unplaced = [a.name for a in _of_kind(ctx.arms, "federated") if a.has_dp and a.epsilon is None]
    if unplaced:
        lines += [f"DP arms without an ε, not plotted: {', '.join(unplaced)}.", ""]
    return lines + privacy_table(ctx.table, ctx.arms, ctx.tasks) + [""]


def section_per_site(ctx: Context) -> list[str]:
    lines = ["## Per-site metrics", ""]
    sc_sites = [s.get("name") for s in _scenario(ctx.results).get("sites") or []]
    sites = ctx.table.sites(sc_sites)
    tasks = [t for t in ctx.tasks if any(ctx.table.has(a.name, t, ctx.table.budgets(t)[0], "local")
                                         for a in ctx.arms)]
    if not sites or not tasks:
        return lines + ["No site-local fine-tuning rows: no per-site plot.", ""]
    path = plot_per_site(ctx.table, ctx.arms, tasks, sites, ctx.plots / "per-site.png")
    return lines + [_image(ctx.run_dir, path, "per-site metrics"), "",
                    "Smallest budget, site-local fine-tuning; error bars: 95 % CI over seeds.", ""]


def section_training(ctx: Context) -> list[str]:
    lines = ["## Pretraining curves", ""]
    curves = ctx.results.get("curves") or []
    if not curve_lines(curves, ctx.arms, "loss"):
        return lines + ["No pretraining curves recorded.", ""]
    path = plot_training(curves, ctx.arms, ctx.plots / "training-curves.png")
    return lines + [_image(ctx.run_dir, path, "pretraining curves"), "",
                    "Federated and central arms: the pooled loss (site `all`); local-only arms: "
                    "one dashed line per site.", ""]


def section_overlays(ctx: Context) -> list[str]:
    lines = ["## Example predictions", ""]
    entries = ctx.results.get("overlays") or []
    if not entries:
        return lines + ["No overlay examples in this run.", ""]
    for i, entry in enumerate(entries):
        lines += [_overlay_line(ctx, i, entry), ""]
    return lines


def _overlay_line(ctx: Context, index: int, entry: dict) -> str:
    """One overlay image, or one line saying why it could not be drawn."""
    source = ctx.run_dir / str(entry.get("file", ""))
    name = _safe_name("overlay", index, entry.get("task", "?"), entry.get("arm", "?"),
                      entry.get("site", "?"))
    try:
        arrays = load_overlay(source)
        path = plot_overlay(entry, arrays, ctx.plots / f"{name}.png")
    except (OSError, ValueError, KeyError) as err:
        return f"Overlay `{entry.get('file')}` skipped: {type(err).__name__}: {err}"
    return _image(ctx.run_dir, path, f"{entry.get('task')} {entry.get('arm')} {entry.get('site')}")


def section_method(ctx: Context) -> list[str]:
    return ["## How the numbers were computed", "",
            "- Each value is the task's headline metric: balanced accuracy (classification), "
            "mean Dice (segmentation), mean landmark error in mm (landmarks; lower is better).",
            "- Site-local fine-tuning: mean over sites and seeds; federated fine-tuning: the "
            "pooled evaluation (site `all`), mean over seeds. Intervals: two-sided 95 % "
            "Student-t (scipy.stats.t) on those values; a single value is shown without one.",
            "- Gaps are signed so that + means the FM is better; the fed/central ratio is "
            "fed/central, or central/fed for lower-is-better metrics, so > 1 means the FM is "
            "better.", "- k = labelled subjects per site; `all` = every labelled subject.", ""]


SECTIONS = (section_headline, section_statements, section_scenario, section_few_shot,
            section_ratio, section_privacy, section_per_site, section_training,
            section_overlays, section_method)


# ---------------------------------------------------------------------------- html


def _inline(text: str) -> str:
    """Escape, then render images, inline code and bold."""
    out = html.escape(text, quote=True)
    out = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", out)


def _html_table(lines: Sequence[str]) -> str:
    split = lambda line: [c.strip().replace("\\|", "|")  # noqa: E731
                          for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
    head = "".join(f"<th>{_inline(c)}</th>" for c in split(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in split(line)) + "</tr>"
                   for line in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(markdown: str, title: str) -> str:
    """The subset of markdown this report writes: headings, tables, lists, images, paragraphs."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if heading := re.match(r"(#{1,6}) (.*)", line):
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            blocks.append(_html_table(lines[i:j]))
            i = j - 1
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            blocks.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j])
                          + "</ul>")
            i = j - 1
        elif line.strip():
            blocks.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px;font-size:90%}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(blocks)
            + "\n</body></html>\n")


# ---------------------------------------------------------------------------- entry point


def write_report(run_dir: Path, results: dict | None = None) -> Path:
    """Write ``run_dir/report.md``, ``report.html`` and PNGs under ``run_dir/plots``.

    Reads ``run_dir/results.json`` when ``results`` is None. Returns the markdown path.
    """
    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir)
    else:
        check_results(results)
    table = Finetune(results.get("finetune") or [])
    ctx = Context(run_dir, results, table, arms_of(results),
                  table.tasks(_scenario(results).get("tasks") or ()))
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    name = _scenario(results).get("name", run_dir.name)
    lines = [f"# FedCMR simulation report: {name}", ""]
    for section in SECTIONS:
        lines += section(ctx)
    markdown = "\n".join(lines)
    report = run_dir / "report.md"
    report.write_text(markdown, encoding="utf-8")
    (run_dir / "report.html").write_text(markdown_to_html(markdown, f"FedCMR report: {name}"),
                                         encoding="utf-8")
    return report
