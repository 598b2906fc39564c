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
    "De-identify, check and store a DICOM export (or a Sunnybrook / ACDC / M&Ms / nnU-Net "
    "folder).\n\n"
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
        "--format", help="Source layout: dicom | sunnybrook | acdc | mnms | nnunet")] = "dicom",
    label_map: Annotated[Optional[list[str]], typer.Option(
        "--label-map", help="nnunet: NAME=structure pairs for label names the intake does not "
                            "know (structures: lv_blood, lv_myo, rv_blood, la_blood, ra_blood, "
                            "scar; or ignore)")] = None,
    sequence: Annotated[Optional[str], typer.Option(
        help="nnunet: the cases' sequence when dataset.json does not tell (cine, lge, ...)")] = None,
    view: Annotated[Optional[str], typer.Option(
        help="nnunet: the cases' view (sax, 2ch, 3ch, 4ch); default from the labels")] = None,
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
    from client.adapters.nnunet import parse_label_map
    from client.intake.pipeline import IngestOptions
    from client.intake.pipeline import ingest as run_ingest

    if source_format not in FORMATS:
        raise typer.BadParameter(f"'{source_format}' is not one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    with user_errors():
        cfg = load_cli_config(config, overrides)
        options = IngestOptions(src=src, store=out, spacing_mm=cfg.data.spacing_mm,
                                crop_px=cfg.data.crop_px, labels=labels, workers=workers,
                                skipped_list=skipped_list, console=Console(stderr=True),
                                label_map=parse_label_map(label_map), sequence=sequence,
                                view=view)
        summary = run_ingest(options, source_format)
    console = Console()
    console.print(summary.table())
    console.print(f"summary written to {out / 'ingest-summary.json'}", highlight=False)


@app.command()
def finetune(
    task: Annotated[str, typer.Option("--task", help="Task name, e.g. sax_seg, view, landmarks, "
                                      "disease (see shared_model.tasks)")],
    store: Annotated[list[Path], typer.Option(
        "--store", help="This node's store (from ingest); repeat to pool several stores")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the fine-tuned bundle")],
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="Foundation-model bundle: a release folder or a run folder with "
                        "config.yaml and encoder.safetensors (default: the shipped model, see "
                        "`fedcmr-client models`)")] = None,
    arch: Annotated[str, typer.Option(
        "--arch", help="fm: fine-tune the foundation model; unet: train a supervised MONAI "
                       "U-Net from scratch on the same data, budget and augmentation")] = "fm",
    label_budget: Annotated[int, typer.Option(
        help="Labelled subjects to train on (0: all not held out)", min=0)] = 0,
    test_fraction: Annotated[float, typer.Option(
        help="Share of labelled subjects held out for evaluation (0: train on every one)",
        min=0.0, max=0.99)] = 0.3,
    config: Annotated[Optional[str], typer.Option(
        "--config", help="Preset for tasks.* settings (default: the built-in fine-tuning "
                         "recipe)")] = None,
    overrides: Overrides = None,
) -> None:
    """Fine-tune a task on this node's labelled data; evaluate on held-out subjects.

    Resumes from OUT/checkpoint.safetensors if a previous session was interrupted.
    """
    from rich.console import Console

    from client.finetune import finetune_on_store, recipe_mode

    if arch not in ("fm", "unet"):
        raise typer.BadParameter(f"'{arch}' is not fm or unet", param_hint="--arch")
    with user_errors():
        cfg = load_cli_config(config, [f"tasks.arch={arch}",
                                       *recipe_mode(task, arch, config, overrides or []),
                                       *(overrides or [])])
        bundle = model if model is not None else shipped_or_none(arch)
        report = finetune_on_store(task, bundle, store, out, cfg, label_budget, test_fraction)
    console = Console()
    tested = (f"tested on {report.test_samples} samples from {report.test_subjects} subjects"
              if report.test_subjects else "no subjects held out")
    console.print(f"{task} ({arch}): trained on {report.train_samples} samples from "
                  f"{report.train_subjects} subjects in {report.steps} steps "
                  f"({report.seconds:.0f} s), {tested}", highlight=False)
    for key, value in sorted(report.metrics.items()):
        console.print(f"  {key:28s} {value:.4f}", highlight=False)
    if report.epsilon:
        console.print(f"  sample-level DP epsilon      {report.epsilon:.3f}", highlight=False)
    console.print(f"bundle written to {out}", highlight=False, soft_wrap=True)


def shipped_or_none(arch: str) -> Path | None:
    """The shipped model (for a U-Net: only its input grid), or None for a U-Net without one."""
    from shared_model.bundle import BundleError
    from shared_model.shipped import default_model

    try:
        return default_model()
    except BundleError:
        if arch == "unet":
            return None
        raise


@app.command()
def models() -> None:
    """List the shipped foundation models (the default is what finetune uses without --model)."""
    from rich.console import Console
    from rich.table import Table

    from shared_model.shipped import models_dir, shipped_models

    found = shipped_models()
    if not found:
        Console().print(f"no shipped models under {models_dir()}", highlight=False)
        return
    table = Table(title=f"shipped models ({models_dir()})")
    for column in ("name", "default", "path", "summary"):
        table.add_column(column, overflow="fold")
    for entry in found:
        table.add_row(entry.name, "yes" if entry.default else "", str(entry.path), entry.summary)
    Console(width=max(Console().width, 120)).print(table)


@app.command()
def predict(
    task: Annotated[str, typer.Option("--task", help="Task name (the bundle must hold it)")],
    model: Annotated[Path, typer.Option("--model", help="Bundle with tasks/<task>.safetensors")],
    source: Annotated[Path, typer.Argument(
        help="A store (from ingest), a DICOM folder (one or more studies) or an nnU-Net "
             "images folder (<case>_0000.nii.gz)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions")] = Path("predictions"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Predict a task. On a store: masks as NIfTI on the store grid, the rest as JSON and CSV.
    On a DICOM folder: <SeriesInstanceUID>.nii.gz and .seg.dcm (DICOM SEG) per segmented series,
    in the source geometry. On an nnU-Net folder: <case>.nii.gz with the image's shape and
    affine. The heart is found before cropping, so the field of view need not be centred."""
    from rich.console import Console

    from client.predict_inputs import predict_input

    with user_errors():
        kind, counts = predict_input(task, model, source, out, device)
    done = counts.get("series", counts.get("cases", 0))
    unit = "cases" if kind == "nnunet" else "series"
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped") or k == "unreadable"}
    Console().print(f"{task}: {done} {unit} predicted ({kind} input); written to {out}"
                    + (f"; skipped {skipped}" if skipped else ""), highlight=False, soft_wrap=True)


@app.command("export-onnx")
def export_onnx_command(
    task: Annotated[str, typer.Option("--task", help="Task name (the bundle must hold it)")],
    model: Annotated[Path, typer.Option("--model", help="Bundle with tasks/<task>.safetensors")],
    out: Annotated[Path, typer.Option("--out", help="The .onnx file to write")],
) -> None:
    """Export a fine-tuned task model as ONNX, checked against PyTorch with onnxruntime."""
    from rich.console import Console

    from client.export import export_onnx

    with user_errors():
        result = export_onnx(task, model, out)
    Console().print(f"{task}: written to {result.path} (input {list(result.input_shape)}, "
                    f"dynamic batch); onnxruntime vs PyTorch max abs difference "
                    f"{result.max_abs_difference:.2e}", highlight=False, soft_wrap=True)


@app.command()
def keygen(out: Annotated[Path, typer.Option("--out", help="Folder for this node's key pair "
                                                         "(keep it on the node)")]) -> None:
    """Make this node's SuperNode key pair (EC P-384, OpenSSH format) and print the public key
    to send to the consortium (`fedcmr-server admit`). Never replaces an existing key."""
    from rich.console import Console

    from client.deployment import generate_node_key

    with user_errors():
        pair = generate_node_key(out)
    console = Console()
    console.print(f"private key (stays here, mode 0600): {pair.private}", highlight=False, soft_wrap=True)
    console.print(f"public key, send to the consortium:  {pair.public}", highlight=False, soft_wrap=True)
    console.print(pair.public_line, highlight=False, soft_wrap=True, markup=False)


@app.command()
def join(
    server: Annotated[str, typer.Option("--server", help="The consortium's SuperLink, HOST:PORT")],
    ca: Annotated[Path, typer.Option("--ca", help="The consortium's CA certificate (ca.crt)")],
    key: Annotated[Path, typer.Option("--key", help="This node's private key (from keygen)")],
    store: Annotated[Path, typer.Option("--store", help="This node's store (from ingest)")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | cuda:0,cuda:1")] = "auto",
    site_index: Annotated[int, typer.Option(
        help="This site's number, as the consortium assigned it (site-N in its records and "
             "privacy ledger; every site needs its own)", min=0)] = 0,
    runtime_port: Annotated[int, typer.Option(
        help="Local port of the SuperNode's own Runtime API (change it to run two nodes on one "
             "machine)", min=1, max=65535)] = 9094,
    max_wait: Annotated[Optional[float], typer.Option(
        help="Give up after this many seconds without the SuperLink (default: keep trying)",
        min=1)] = None,
    require_secagg: Annotated[bool, typer.Option(
        help="Train only in SecAgg+ rounds (refuse plaintext rounds)")] = False,
    min_secagg_threshold: Annotated[int, typer.Option(
        help="Refuse SecAgg+ rounds with a lower reconstruction threshold", min=2)] = 2,
    min_secagg_shares: Annotated[int, typer.Option(
        help="Refuse SecAgg+ rounds with fewer shares", min=2)] = 2,
    min_noise_multiplier: Annotated[float, typer.Option(
        help="> 0: train only plans with DP-SGD noise this node adds itself "
             "(privacy.mode=sample) of at least this multiplier", min=0.0)] = 0.0,
    max_epsilon: Annotated[float, typer.Option(
        help="> 0: this node's own privacy budget over every DP round it trains, across runs "
             "and restarts (kept in STORE/node-state)", min=0.0)] = 0.0,
    privacy_delta: Annotated[float, typer.Option(
        help="The delta of the node's own budget", min=0.0, max=1.0)] = 1.0e-5,
    max_message_mb: Annotated[float, typer.Option(
        help="> 0: refuse instructions and withhold replies larger than this (MB)", min=0.0)] = 0.0,
) -> None:
    """Join the federation: run the stock flower-supernode with TLS, this node's key and its
    store, in the foreground until stopped (Ctrl-C / SIGTERM)."""
    from client.deployment import JoinSettings, run_supernode
    from client.node_settings import NodePolicy

    policy = NodePolicy(min_secagg_threshold=min_secagg_threshold, min_secagg_shares=min_secagg_shares,
                        require_secagg=require_secagg, min_noise_multiplier=min_noise_multiplier,
                        max_epsilon=max_epsilon, delta=privacy_delta, max_message_mb=max_message_mb)
    with user_errors():
        status = run_supernode(JoinSettings(server=server, ca_cert=ca, key=key, store=store, device=device,
                                            site_index=site_index, runtime_port=runtime_port, max_wait_s=max_wait,
                                            policy=policy))
    raise typer.Exit(status)


def main() -> None:
    app()
