"""fedcmr-sim: simulate a federation of hospital sites on one machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from shared_model.cli_edge import Overrides, add_config_commands, load_cli_config, user_errors
from shared_model.config import ConfigError

app = typer.Typer(help="Simulate FedCMR federations of virtual hospital sites.",
                  no_args_is_help=True, add_completion=False)
add_config_commands(app)
console = Console()


def _federate(preset: str | Path, out: Path, overrides: list[str] | None, resume: bool) -> None:
    from server.metrics import METRICS_CSV, METRICS_JSON
    from server.run_status import RunStatus
    from shared_model.config import RESOLVED_CONFIG_NAME, with_overrides
    from sim.runner import run_federation
    from sim.scenario import prepare_sites

    cfg = load_cli_config(preset, [*(overrides or []), *(["output.resume=true"] if resume else [])],
                          out=out)
    start = time.perf_counter()
    sites = prepare_sites(cfg, out)  # the cohort as DICOM, through the nodes' intake
    if cfg.federation.min_sites is not None and cfg.federation.min_sites > len(sites):
        raise ConfigError(f"key 'federation.min_sites': {cfg.federation.min_sites} is more "
                          f"than the {len(sites)} simulated sites")
    cfg = with_overrides(cfg, [f"sim.sites={len(sites)}", "sim.real_sites=[]",
                               f"federation.min_sites={cfg.federation.min_sites or len(sites)}"])
    outcome = run_federation(cfg, out / "sites")
    elapsed = time.perf_counter() - start
    if outcome.status != RunStatus.released:
        console.print(f"federation {outcome.status} after {elapsed:.0f} s: {outcome.detail}",
                      soft_wrap=True, highlight=False)
        if outcome.status in (RunStatus.stopped, RunStatus.failed):
            raise typer.Exit(1)
        return
    console.print(f"federation finished in {elapsed:.0f} s; outputs:")
    for name, path in (("resolved config", out / RESOLVED_CONFIG_NAME),
                       ("release (encoder, tasks, model card)", Path(outcome.detail)),
                       ("per-round metrics", out / METRICS_JSON),
                       ("per-round metrics, CSV", out / METRICS_CSV),
                       ("TensorBoard", out / "tensorboard")):
        console.print(f"  {name:38s} {path}", soft_wrap=True, highlight=False)


def _scenario(preset: str | Path, out: Path, overrides: list[str] | None) -> None:
    from sim.results import RESULTS_FILE
    from sim.scenario import run_scenario

    cfg = load_cli_config(preset, overrides, out=out)
    start = time.perf_counter()
    report = run_scenario(cfg, out)
    console.print(f"scenario finished in {time.perf_counter() - start:.0f} s; outputs:")
    for name, path in (("report", report), ("report (HTML)", report.with_suffix(".html")),
                       ("results", out / RESULTS_FILE), ("plots", out / "plots"),
                       ("resolved config", out / "config.yaml")):
        console.print(f"  {name:16s} {path}", soft_wrap=True, highlight=False)


@app.command()
def demo(out: Annotated[Path, typer.Option("--out", help="Run folder to write into")] = Path("runs/demo"),
         model: Annotated[Optional[Path], typer.Option(
             "--model", help="Foundation-model bundle (default: the shipped model)")] = None,
         seconds: Annotated[float, typer.Option(help="Fine-tuning budget per arm, seconds")] = 70.0,
         rounds: Annotated[int, typer.Option(help="Rounds of the federated pretraining shown")] = 3,
         ) -> None:
    """The demo on real patients (what `make demo` runs): federated pretraining with its health
    signals, then the shipped foundation model, scratch and a U-Net fine-tuned on one labelled
    patient and scored on held-out patients, with overlays. The synthetic demo scenario is
    `fedcmr-sim run demo-cpu`."""
    from shared_model.shipped import default_model
    from sim.demo import run_demo

    with user_errors():
        start = time.perf_counter()
        report = run_demo(out, model or default_model(), seconds, rounds)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {report} "
                  f"(and {report.with_suffix('.html')})", soft_wrap=True, highlight=False)


@app.command()
def run(config: Annotated[str, typer.Argument(help="Scenario preset from configs/ or a YAML path")],
        out: Annotated[Path, typer.Option("--out", help="Run folder to write into")],
        overrides: Overrides = None) -> None:
    """Run the scenario described by CONFIG: cohort, intake, pretraining arms, few-shot
    fine-tuning, results.json and report.md."""
    with user_errors():
        _scenario(config, out, overrides)


@app.command()
def federate(config: Annotated[str, typer.Argument(help="Preset name or YAML path")],
             out: Annotated[Path, typer.Option("--out", help="Run folder to write into")],
             overrides: Overrides = None,
             resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out "
                                                  "from its checkpoint at the next round")] = False) -> None:
    """One federation (the ServerApp's phases and release) over the scenario's sites (cohort
    and intake as for `run`), without baselines; --resume continues an interrupted or paused run."""
    with user_errors():
        _federate(config, out, overrides, resume)


@app.command()
def cohort(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort into (DICOM "
                                      "export and labels per site, cohort.json)")],
    sites: Annotated[int, typer.Option("--sites", min=1, help="Number of hospital sites")] = 4,
    subjects_per_site: Annotated[int, typer.Option(
        "--subjects-per-site", min=1,
        help="Mean subjects per site: sites differ in size, each has at least one, the cohort "
             "holds sites x this")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed writes the same "
                                      "cohort byte for byte")] = 0,
    phases: Annotated[Optional[int], typer.Option(
        "--phases", min=2, help="Cine phases for every site (default: each site's own, 20-30)")
    ] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1,
        help="Processes rendering subjects in parallel (output does not depend on it)")] = 2,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Replace a cohort already in --out (its cohort.json and site-* folders only)")
    ] = False,
) -> None:
    """Write a synthetic multi-site cardiac MR cohort as DICOM, with labels beside the images.

    Per site: a PACS-like DICOM export (sites differ in vendor, field strength, resolution and
    disease mix; headers carry planted PHI) and labels (NIfTI masks, landmark/class CSVs).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sim.cohort import SubjectResult, plan_jobs, write_cohort
    from sim.study import StudyOptions

    with user_errors():
        start = time.perf_counter()
        options = StudyOptions(cine_phases=phases)
        total = len(plan_jobs(out, sites, subjects_per_site, seed, options))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("subjects"), TimeElapsedColumn())
        frames = 0
        with Progress(*columns, console=console, auto_refresh=False) as progress:
            task = progress.add_task(f"writing {sites} sites", total=total)

            def done(result: SubjectResult) -> None:
                nonlocal frames
                frames += result.frames
                progress.advance(task)
                progress.refresh()  # no refresh thread: worker processes are forked

            summary = write_cohort(out, sites, subjects_per_site, seed, options,
                                   workers=workers, overwrite=overwrite, on_subject=done)
        elapsed = time.perf_counter() - start
        console.print(f"cohort of {total} subjects ({frames} frames) written to {out} in "
                      f"{elapsed:.1f} s", soft_wrap=True, highlight=False)
        for site in summary["sites"]:
            console.print(f"  {site['name']}: {site['vendor']} {site['field_strength_t']} T, "
                          f"{site['pixel_spacing_mm']} mm, {site['subjects']} subjects "
                          f"{ {k: v for k, v in site['diseases'].items() if v} }",
                          soft_wrap=True, highlight=False)


def main() -> None:
    app()
