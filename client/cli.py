"""fedcmr-client: the hospital node's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared_model.cli_edge import Overrides, add_config_commands, load_cli_config, user_errors

app = typer.Typer(help="FedCMR hospital node: local data, federation, local fine-tuning.",
                  no_args_is_help=True, add_completion=False)
add_config_commands(app)


_INGEST_HELP = (
    "De-identify, check and store a DICOM export (or a Sunnybrook / ACDC / M&Ms folder).\n\n"
    "Writes STORE/ingest-summary.json (files_seen, files_accepted, series, skipped reason -> "
    "count) and prints it. Skipped files are not an error: the exit status is non-zero only for "
    "bad arguments. Re-running on the same export only does what is missing.")


@app.command(help=_INGEST_HELP)
def ingest(
    src: Annotated[Path, typer.Argument(help="The export folder (searched recursively; any file "
                                             "names) or a single file")],
    out: Annotated[Path, typer.Option("--out", help="The node's store folder (created if new)")],
    labels: Annotated[Optional[Path], typer.Option(
        help="Label folder (series.csv, studies.csv, landmarks.csv, masks/) for --format dicom; "
             "the M&Ms information CSV for --format mnms")] = None,
    source_format: Annotated[str, typer.Option(
        "--format", help="Source layout: dicom | sunnybrook | acdc | mnms")] = "dicom",
    config: Annotated[str, typer.Option(
        "--config", help="Preset name or YAML path (data.spacing_mm, data.crop_px)")] = "demo-cpu",
    workers: Annotated[int, typer.Option(help="Reading processes (0: up to 2)", min=0)] = 0,
    skipped_list: Annotated[Optional[Path], typer.Option(
        help="Also write a CSV of skipped files and reasons here (node-local: it holds file "
             "paths, so it may not go inside the store)")] = None,
    overrides: Overrides = None,
) -> None:
    """The ``ingest`` command (help text in ``_INGEST_HELP``)."""
    from rich.console import Console

    from client.adapters import FORMATS
    from client.intake.pipeline import IngestOptions
    from client.intake.pipeline import ingest as run_ingest

    if source_format not in FORMATS:
        raise typer.BadParameter(f"'{source_format}' is not one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    with user_errors():
        cfg = load_cli_config(config, overrides)
        options = IngestOptions(src=src, store=out, spacing_mm=cfg.data.spacing_mm,
                                crop_px=cfg.data.crop_px, labels=labels, workers=workers,
                                skipped_list=skipped_list, console=Console(stderr=True))
        summary = run_ingest(options, source_format)
    console = Console()
    console.print(summary.table())
    console.print(f"summary written to {out / 'ingest-summary.json'}", highlight=False)


@app.command()
def finetune(
    task: Annotated[str, typer.Option("--task", help="Task name, e.g. sax_seg, view, landmarks, "
                                      "disease (see shared_model.tasks)")],
    model: Annotated[Path, typer.Option("--model", help="Model bundle: a release folder or a "
                                        "run folder with config.yaml and encoder.safetensors")],
    store: Annotated[Path, typer.Option("--store", help="This node's store (from ingest)")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the fine-tuned bundle")],
    label_budget: Annotated[int, typer.Option(
        help="Labelled subjects to train on (0: all not held out)", min=0)] = 0,
    test_fraction: Annotated[float, typer.Option(
        help="Share of labelled subjects held out for evaluation", min=0.01, max=0.99)] = 0.3,
    config: Annotated[str, typer.Option("--config", help="Preset for tasks.* settings")] = "demo-cpu",
    overrides: Overrides = None,
) -> None:
    """Fine-tune a task on this node's labelled data; evaluate on held-out subjects.

    Resumes from OUT/checkpoint.safetensors if a previous session was interrupted.
    """
    from rich.console import Console

    from client.finetune import finetune_on_store

    with user_errors():
        cfg = load_cli_config(config, overrides)
        report = finetune_on_store(task, model, store, out, cfg, label_budget, test_fraction)
    console = Console()
    console.print(f"{task}: trained on {report.train_samples} samples from "
                  f"{report.train_subjects} subjects, tested on {report.test_samples} samples "
                  f"from {report.test_subjects} subjects", highlight=False)
    for key, value in sorted(report.metrics.items()):
        console.print(f"  {key:28s} {value:.4f}", highlight=False)
    if report.epsilon:
        console.print(f"  sample-level DP epsilon      {report.epsilon:.3f}", highlight=False)
    console.print(f"bundle written to {out}", highlight=False, soft_wrap=True)


@app.command()
def predict(
    task: Annotated[str, typer.Option("--task", help="Task name (the bundle must hold it)")],
    model: Annotated[Path, typer.Option("--model", help="Bundle with tasks/<task>.safetensors")],
    store: Annotated[Path, typer.Argument(help="Store to predict on (from ingest)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions")] = Path("predictions"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Predict a task for every matching series: masks as NIfTI, the rest as JSON and CSV."""
    from rich.console import Console

    from client.finetune import predict_on_store

    with user_errors():
        counts = predict_on_store(task, model, store, out, device)
    Console().print(f"{task}: {counts['series']} series predicted; written to {out}",
                    highlight=False, soft_wrap=True)


def main() -> None:
    app()
