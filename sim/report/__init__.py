"""The researcher's report of a simulation scenario: ``results.json`` -> report.md/.html + PNGs.

The question a scenario answers is whether federated self-supervised pretraining (the "FM") gives
better fine-tuned models than training from scratch or pretraining at each site alone, and how
close it comes to pooling all images centrally. The report leads with that answer in numbers and
in plain sentences, then shows the evidence: few-shot curves, fed/central ratio, privacy-utility,
per-site metrics, pretraining curves and example predictions.

The pieces, in the order the data flow: :mod:`sim.results` (the schema the scenario writes),
:mod:`sim.report.stats` (means and intervals), :mod:`sim.report.table` (rows by arm, task,
budget and mode), :mod:`sim.report.findings` (the headline and the sentences),
:mod:`sim.report.plots` (figures), :mod:`sim.report.sections` (markdown) and
:mod:`sim.report.page` (HTML).
"""

from __future__ import annotations

from pathlib import Path

from sim.report.findings import Headline, headline, plain_statements
from sim.report.page import markdown_to_html
from sim.report.plots import dice_per_structure, landmark_errors_mm
from sim.report.sections import SECTIONS, ReportContext
from sim.report.stats import mean_ci
from sim.report.table import FinetuneTable
from sim.report.text import budget_label
from sim.results import ScenarioResults, load_results

REPORT_FILE = "report.md"


def write_report(run_dir: Path, results: ScenarioResults | None = None) -> Path:
    """Write ``run_dir/report.md``, ``report.html`` and PNGs under ``run_dir/plots``.

    Reads ``run_dir/results.json`` when ``results`` is None. Returns the markdown path.
    """
    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir)
    table = FinetuneTable(results.finetune)
    ctx = ReportContext(run_dir, results, table, results.arm_order(), table.tasks(results.scenario.tasks))
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    name = results.scenario.name or run_dir.name
    lines = [f"# FedCMR simulation report: {name}", ""]
    for section in SECTIONS:
        lines += section(ctx)
    text = "\n".join(lines)
    report = run_dir / REPORT_FILE
    report.write_text(text, encoding="utf-8")
    (run_dir / "report.html").write_text(markdown_to_html(text, f"FedCMR report: {name}"), encoding="utf-8")
    return report


__all__ = ["Headline", "budget_label", "dice_per_structure", "headline", "landmark_errors_mm",
           "mean_ci", "plain_statements", "write_report"]
