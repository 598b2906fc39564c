"""fedcmr-client: the hospital node's command line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from shared_model.cli_common import console as error_console
from shared_model.cli_common import load_cli_config, print_config, print_presets, user_errors

app = typer.Typer(help="FedCMR hospital node: local data, federation, local fine-tuning.",
                  no_args_is_help=True, add_completion=False)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides as key=value")]


@app.command("config")
def show_config(config: Annotated[str, typer.Argument(help="Preset name or YAML path")] = "demo-cpu",
                overrides: Overrides = None) -> None:
    """Print the resolved config (preset + overrides), or the error that stops it."""
    with user_errors():
        print_config(load_cli_config(config, overrides))


@app.command()
def presets() -> None:
    """List the encoder presets and their timm names."""
    print_presets()


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
    with user_errors(), _intake_errors():
        cfg = load_cli_config(config, overrides)
        options = IngestOptions(src=src, store=out, spacing_mm=cfg.data.spacing_mm,
                                crop_px=cfg.data.crop_px, labels=labels, workers=workers,
                                skipped_list=skipped_list, console=Console(stderr=True))
        summary = run_ingest(options, source_format)
    console = Console()
    console.print(summary.table())
    console.print(f"summary written to {out / 'ingest-summary.json'}", highlight=False)


@contextlib.contextmanager
def _intake_errors() -> Iterator[None]:
    """Argument problems the intake finds (source inside the store, damaged label CSV): exit 2."""
    from client.intake.label_files import LabelFileError
    from client.intake.pipeline import IntakeError

    try:
        yield
    except (IntakeError, LabelFileError) as exc:
        error_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


def main() -> None:
    app()
