"""The report's figures, drawn from the results' dataclasses.

Plots use matplotlib's object API (``Figure``) with the Agg renderer: no display and no global
pyplot state. Each ``plot_*`` function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from shared_model.labels import MASK_VALUES
from sim.report.findings import Ratio, privacy_point
from sim.report.stats import Stat, higher_is_better
from sim.report.table import MODES, FinetuneTable, of_kind, privacy_arms
from sim.report.text import budget_label, metric_label, unit
from sim.results import POOLED_SITE, Arm, ArmKind, Curve, FinetuneMode, Overlay

DPI = 90
FED_MAE_ANCHOR = 0.955  # Fed-MAE / centralised MAE, Yan et al. 2023 (published anchor)
FED_CENTRAL_GOAL = 0.98  # FedCMR's goal for the same ratio
STRUCTURE_COLOURS = {"lv_blood": "#e41a1c", "lv_myo": "#4daf4a", "rv_blood": "#377eb8",
                     "la_blood": "#ff7f00", "ra_blood": "#984ea3", "scar": "#ffff33"}
STRUCTURE_NAMES = {value: name for name, value in MASK_VALUES.items()}
Colour = tuple[float, float, float, float]


# ---------------------------------------------------------------------------- helpers


def _colours(arms: Sequence[Arm]) -> dict[str, Colour]:
    cmap = colormaps["tab10"]
    return {a.name: cmap(i % 10) for i, a in enumerate(arms)}


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
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


def safe_name(*parts: object) -> str:
    """A file name made of ``parts``: anything but letters, digits, ``_`` and ``.`` becomes ``_``."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts)


def _axis_label(metric: str) -> str:
    arrow = "↑" if higher_is_better(metric) else "↓"
    return f"{metric_label(metric)}{unit(metric)} ({arrow} better)"


def _errorbar(ax: Axes, x: float, stat: Stat, **style: Any) -> None:
    """A point with its CI as an error bar; a bare point when there is no interval."""
    ax.errorbar([x], [stat.mean], yerr=_yerr(stat), capsize=3, **style)


def _yerr(stat: Stat) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar for one point; None when there is no interval."""
    if stat.low is None or stat.high is None:
        return None
    return [[stat.mean - stat.low], [stat.high - stat.mean]]


# ---------------------------------------------------------------------------- few-shot curves


def plot_few_shot(table: FinetuneTable, arms: Sequence[Arm], task: str, path: Path) -> Path:
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


def _few_shot_line(ax: Axes, table: FinetuneTable, arm: str, task: str, budgets: Sequence[int],
                   mode: FinetuneMode, colour: Colour) -> None:
    points = [(i, s) for i, b in enumerate(budgets) if (s := table.stat(arm, task, b, mode))]
    if not points:
        return
    x = [i for i, _ in points]
    ax.plot(x, [s.mean for _, s in points], marker="o", color=colour, label=arm)
    band = [(i, s.low, s.high) for i, s in points if s.low is not None and s.high is not None]
    if band:
        ax.fill_between([i for i, _, _ in band], [lo for _, lo, _ in band],
                        [hi for _, _, hi in band], color=colour, alpha=0.2)


# ---------------------------------------------------------------------------- fed / central


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


def _epsilon_x(arm: Arm, x_inf: float) -> float:
    """Where an arm sits on the epsilon axis: its epsilon, or 'no DP' at the right."""
    return arm.epsilon if arm.has_dp and arm.epsilon is not None else x_inf


def plot_privacy(table: FinetuneTable, arms: Sequence[Arm], tasks: Sequence[str], path: Path) -> Path:
    """Metric vs epsilon per task at the smallest budget; no-DP arms at 'no DP' on the right."""
    fed = privacy_arms(arms)
    finite = sorted({a.epsilon for a in fed if a.has_dp and a.epsilon is not None})
    x_inf = finite[-1] * 4
    colours = _colours(arms)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        budget = table.budgets(task)[0]
        for series in _dp_series(fed):
            pts = [(_epsilon_x(a, x_inf), s) for a in series
                   if (s := privacy_point(table, a, task, budget))]
            ax.plot([x for x, _ in pts], [s.mean for _, s in pts], color="grey", lw=0.8)
        for arm in fed:
            if stat := privacy_point(table, arm, task, budget):
                _errorbar(ax, _epsilon_x(arm, x_inf), stat, color=colours[arm.name], marker="o",
                          label=arm.name)
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
                        key=lambda a: a.epsilon or 0.0)
        plain = [a for a in fed if not a.has_dp and a.method == key[0]]
        out.append(series + plain[:1])
    return out


def _scratch_line(ax: Axes, table: FinetuneTable, arms: Sequence[Arm], task: str, budget: int) -> None:
    for arm in of_kind(arms, ArmKind.scratch)[:1]:
        if stat := privacy_point(table, arm, task, budget):
            ax.axhline(stat.mean, color="black", ls=":", lw=1, label=f"{arm.name}")


# ---------------------------------------------------------------------------- per site


def plot_per_site(table: FinetuneTable, arms: Sequence[Arm], tasks: Sequence[str],
                  sites: Sequence[str], path: Path) -> Path:
    """Grouped bars: site x arm at the task's smallest budget, site-local fine-tuning."""
    colours = _colours(arms)
    fig, axes = _grid(len(tasks), width=max(4.2, 1.1 * len(sites) + 1.5))
    for ax, task in zip(axes, tasks):
        budget = table.budgets(task)[0]
        shown = [a for a in arms if table.has(a.name, task, budget, FinetuneMode.local)]
        width = 0.8 / max(len(shown), 1)
        for j, arm in enumerate(shown):
            for i, site in enumerate(sites):
                stat = table.stat(arm.name, task, budget, FinetuneMode.local, site=site)
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


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend under all panels, so it never hides a bar."""
    labelled: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="outside lower center",
                   ncols=min(len(labelled), 6), fontsize=7)


# ---------------------------------------------------------------------------- training curves


def curve_lines(curves: Sequence[Curve], arms: Sequence[Arm], key: str) -> dict[str, list[tuple[int, float]]]:
    """Label -> [(round, value)]: site "all" for federated/central arms, each site for local."""
    out: dict[str, list[tuple[int, float]]] = {}
    for arm in arms:
        rows = [(c.site, c.round, value) for c in curves
                if c.arm == arm.name and (value := getattr(c, key)) is not None]
        if arm.kind != ArmKind.local:  # the pooled curve where there is one
            rows = [r for r in rows if r[0] == POOLED_SITE] or rows
        for site in dict.fromkeys(s for s, _, _ in rows):
            label = arm.name if site == POOLED_SITE else f"{arm.name} {site}"
            out[label] = sorted((n, v) for s, n, v in rows if s == site)
    return out


def _site_style(site: str) -> str | tuple[int, tuple[int, ...]]:
    """Solid for a pooled curve; a distinct dash pattern per site for local-only arms."""
    if not site:
        return "-"
    index = int(m.group()) if (m := re.search(r"\d+", site)) else len(site)
    styles: list[str | tuple[int, tuple[int, ...]]] = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
    return styles[index % 4]


def plot_training(curves: Sequence[Curve], arms: Sequence[Arm], path: Path) -> Path:
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


def plot_overlay(entry: Overlay, arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Image with true (solid) vs predicted (dashed) contours, or true vs predicted landmarks."""
    fig = Figure(figsize=(4.6, 4.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.asarray(arrays["image"], dtype=float), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    where = f"{entry.task} — {entry.arm} — {entry.site}"
    if "true_mask" in arrays and "pred_mask" in arrays:
        summary = _draw_masks(ax, arrays["true_mask"], arrays["pred_mask"])
    elif "true_points" in arrays and "pred_points" in arrays:
        summary = _draw_points(ax, arrays)
    else:
        raise KeyError("neither true_mask/pred_mask nor true_points/pred_points")
    ax.set_title(f"{where}\n{summary}", fontsize=8)
    return _save(fig, path)


def _draw_masks(ax: Axes, true: np.ndarray, pred: np.ndarray) -> str:
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


def _draw_points(ax: Axes, arrays: dict[str, np.ndarray]) -> str:
    true = np.asarray(arrays["true_points"], dtype=float)
    pred = np.asarray(arrays["pred_points"], dtype=float)
    names = [str(n) for n in arrays.get("names", [])] or [f"#{i}" for i in range(len(true))]
    errors = landmark_errors_mm(true, pred, arrays.get("spacing_mm", np.ones(1)))
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
