"""The report's markdown: one function per section, each a list of lines.

A section whose data are missing is skipped with one line that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sim.report.findings import fed_central_ratios, headline, plain_statements, privacy_point
from sim.report.plots import (
    FED_CENTRAL_GOAL,
    FED_MAE_ANCHOR,
    curve_lines,
    load_overlay,
    plot_few_shot,
    plot_overlay,
    plot_per_site,
    plot_privacy,
    plot_ratios,
    plot_training,
    safe_name,
)
from sim.report.table import MODES, FinetuneTable, of_kind, privacy_arms
from sim.report.text import MISSING, budget_label, fmt_gap, fmt_stat, fmt_value, metric_label
from sim.results import Arm, ArmKind, FinetuneMode, Overlay, ScenarioResults


@dataclass
class ReportContext:
    """What every section needs: the run folder, the results, the rows, the arms and the tasks."""

    run_dir: Path
    results: ScenarioResults
    table: FinetuneTable
    arms: list[Arm]
    tasks: list[str]

    @property
    def plots(self) -> Path:
        return self.run_dir / "plots"


def md_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _image(run_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


def _or_missing(value: object) -> object:
    return MISSING if value is None else value


def section_headline(ctx: ReportContext) -> list[str]:
    h = headline(ctx.results)
    lines = ["## Headline", ""]
    if h.task is None or h.fm_arm is None or h.metric is None or h.budget is None:
        return lines + ["No fine-tuning results for a federated arm: no headline.", ""]
    metric = h.metric
    direction = "higher is better" if h.higher_is_better else "lower is better"
    rows: list[list[object]] = [["task", h.task], ["labelled subjects per site", budget_label(h.budget)],
            ["metric", f"{metric} ({direction})"], ["fine-tuning mode", h.mode],
            [f"FM ({h.fm_arm})", fmt_value(h.fm, metric)], ["scratch", fmt_value(h.scratch, metric)],
            ["local-only (mean of arms)", fmt_value(h.local, metric)],
            ["central", fmt_value(h.central, metric)],
            ["supervised U-Net", fmt_value(h.unet, metric)],
            ["gap vs scratch (+ = FM better)", fmt_gap(h.gap_vs_scratch, metric)],
            ["gap vs local-only (+ = FM better)", fmt_gap(h.gap_vs_local, metric)],
            ["gap vs the U-Net (+ = FM better)", fmt_gap(h.gap_vs_unet, metric)],
            ["fed/central ratio (> 1 = FM better)", fmt_value(h.fed_central_ratio)]]
    return lines + md_table(["", "value"], rows) + [""]


def section_statements(ctx: ReportContext) -> list[str]:
    lines = ["## Does federated pretraining help?", "",
             "Each comparison uses federated fine-tuning when both sides have it, else "
             "site-local fine-tuning (mean over sites and seeds).", ""]
    return lines + [f"- {s}" for s in plain_statements(ctx.results)] + [""]


def section_scenario(ctx: ReportContext) -> list[str]:
    sc = ctx.results.scenario
    sites = [[s.name, s.source, s.vendor, s.field_strength_t, s.subjects] for s in sc.sites]
    lines = ["## Scenario", "", f"Name: `{sc.name or '?'}`; config: `{sc.config or '?'}`"
             " (resolved config and every number behind the plots: `results.json`).", ""]
    if sites:
        lines += md_table(["site", "source", "vendor", "field strength (T)", "subjects"],
                          sites) + [""]
    budgets = ", ".join(budget_label(b) for b in sorted(sc.label_budgets, key=lambda b: (b == 0, b)))
    lines += [f"- tasks: {', '.join(sc.tasks or ctx.tasks)}",
              f"- labelled subjects per site: {budgets or MISSING}",
              f"- seeds: {', '.join(str(s) for s in sc.seeds) or MISSING}", ""]
    return lines + section_arms(ctx) + section_timings(ctx)


def section_arms(ctx: ReportContext) -> list[str]:
    rows = [[a.name, a.kind, a.method.value if a.method else MISSING, "yes" if a.secagg else "no",
             a.dp_mode.value, MISSING if a.epsilon is None else f"{a.epsilon:g}",
             a.teacher.value if a.teacher else MISSING,
             _or_missing(a.rounds), _or_missing(a.images_seen), _or_missing(a.seconds)]
            for a in ctx.arms]
    header = ["arm", "kind", "method", "SecAgg+", "DP", "ε", "teacher", "rounds", "images seen",
              "seconds"]
    return md_table(header, rows) + [""] if rows else ["No arms listed.", ""]


def section_timings(ctx: ReportContext) -> list[str]:
    timings = ctx.results.timings_s
    if not timings:
        return ["No timings recorded.", ""]
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in timings.items()]
    return ["Timings:", ""] + md_table(["stage", "seconds"], rows) + [""]


def few_shot_table(table: FinetuneTable, arms: Sequence[Arm], task: str) -> list[str]:
    """Markdown: arm x budget, mean [95 % CI] (n), one table per mode with rows."""
    budgets, lines = table.budgets(task), []
    for mode in MODES:
        rows = [[a.name] + [fmt_stat(table.stat(a.name, task, b, mode)) for b in budgets]
                for a in arms if any(table.has(a.name, task, b, mode) for b in budgets)]
        if rows:
            lines += [f"*{mode} fine-tuning, {metric_label(table.metric(task))}:*", ""]
            lines += md_table(["arm"] + [f"k={budget_label(b)}" for b in budgets], rows) + [""]
    return lines


def section_few_shot(ctx: ReportContext) -> list[str]:
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
                                 ctx.plots / f"few-shot-{safe_name(task)}.png")
            lines += [_image(ctx.run_dir, path, f"few-shot {task}"), ""]
        lines += few_shot_table(ctx.table, ctx.arms, task)
    return lines


def section_ratio(ctx: ReportContext) -> list[str]:
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
                    f"{FED_CENTRAL_GOAL}.", ""] + md_table(
        ["task", "k", "FM arm", "central arm", "mode", "ratio"], rows) + [""]


def privacy_table(table: FinetuneTable, arms: Sequence[Arm], tasks: Sequence[str]) -> list[str]:
    rows = []
    for arm in privacy_arms(arms):
        cells = [fmt_stat(privacy_point(table, arm, t, table.budgets(t)[0])) for t in tasks]
        eps = f"{arm.epsilon:g}" if arm.has_dp and arm.epsilon is not None else "∞ (no DP)"
        rows.append([arm.name, arm.dp_mode.value, eps, "yes" if arm.secagg else "no"] + cells)
    heads = [f"{t} (k={budget_label(table.budgets(t)[0])})" for t in tasks]
    return md_table(["arm", "DP", "ε", "SecAgg+"] + heads, rows)


def section_privacy(ctx: ReportContext) -> list[str]:
    lines = ["## Privacy vs utility", ""]
    if not any(a.has_dp for a in privacy_arms(ctx.arms)) or not ctx.tasks:
        return lines + ["No DP arms with an ε in this scenario: no privacy-utility plot.", ""]
    path = plot_privacy(ctx.table, ctx.arms, ctx.tasks, ctx.plots / "privacy-utility.png")
    lines += [_image(ctx.run_dir, path, "privacy-utility"), "",
              "Smallest budget per task; federated fine-tuning where the arm has it, "
              "else local. Dotted line: scratch.", ""]
    unplaced = [a.name for a in of_kind(ctx.arms, ArmKind.federated) if a.has_dp and a.epsilon is None]
    if unplaced:
        lines += [f"DP arms without an ε, not plotted: {', '.join(unplaced)}.", ""]
    return lines + privacy_table(ctx.table, ctx.arms, ctx.tasks) + [""]


def section_per_site(ctx: ReportContext) -> list[str]:
    lines = ["## Per-site metrics", ""]
    sites = ctx.table.sites([s.name for s in ctx.results.scenario.sites])
    tasks = [t for t in ctx.tasks if any(ctx.table.has(a.name, t, ctx.table.budgets(t)[0], FinetuneMode.local)
                                         for a in ctx.arms)]
    if not sites or not tasks:
        return lines + ["No site-local fine-tuning rows: no per-site plot.", ""]
    path = plot_per_site(ctx.table, ctx.arms, tasks, sites, ctx.plots / "per-site.png")
    return lines + [_image(ctx.run_dir, path, "per-site metrics"), "",
                    "Smallest budget, site-local fine-tuning; error bars: 95 % CI over seeds.", ""]


def section_training(ctx: ReportContext) -> list[str]:
    lines = ["## Pretraining curves", ""]
    curves = ctx.results.curves
    if not curve_lines(curves, ctx.arms, "loss"):
        return lines + ["No pretraining curves recorded.", ""]
    path = plot_training(curves, ctx.arms, ctx.plots / "training-curves.png")
    return lines + [_image(ctx.run_dir, path, "pretraining curves"), "",
                    "Federated and central arms: the pooled loss (site `all`); local-only arms: "
                    "one dashed line per site.", ""]


def section_overlays(ctx: ReportContext) -> list[str]:
    lines = ["## Example predictions", ""]
    if not ctx.results.overlays:
        return lines + ["No overlay examples in this run.", ""]
    for i, entry in enumerate(ctx.results.overlays):
        lines += [_overlay_line(ctx, i, entry), ""]
    return lines


def _overlay_line(ctx: ReportContext, index: int, entry: Overlay) -> str:
    """One overlay image, or one line saying why it could not be drawn."""
    name = safe_name("overlay", index, entry.task, entry.arm, entry.site)
    try:
        arrays = load_overlay(ctx.run_dir / entry.file)
        path = plot_overlay(entry, arrays, ctx.plots / f"{name}.png")
    except (OSError, ValueError, KeyError) as err:
        return f"Overlay `{entry.file}` skipped: {type(err).__name__}: {err}"
    return _image(ctx.run_dir, path, f"{entry.task} {entry.arm} {entry.site}")


def section_method(ctx: ReportContext) -> list[str]:
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
