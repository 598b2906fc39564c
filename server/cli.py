"""fedcmr-server: the consortium's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared_model.cli_edge import add_config_commands, user_errors

app = typer.Typer(help="FedCMR consortium server: federated rounds, privacy budget, release.",
                  no_args_is_help=True, add_completion=False)
add_config_commands(app)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A federation's output.dir")]) -> None:
    """A run's state: outcome, rounds per phase, the latest checkpoint and the privacy ledger."""
    from rich.console import Console
    from rich.table import Table

    from server.ledger import PrivacyLedger
    from server.metrics import RecordKind, RoundStatus, read_records
    from server.run_status import read_outcome
    from server.state import CHECKPOINT_FILE, load_state
    from shared_model.config import RESOLVED_CONFIG_NAME, load_config

    with user_errors():
        console = Console()
        outcome = read_outcome(run_dir)
        console.print(f"status: {outcome.status if outcome else 'running or interrupted'}", highlight=False)
        phases: dict[str, list[dict]] = {}
        for record in read_records(run_dir):
            if record["kind"] == RecordKind.fit:
                phases.setdefault(record["phase"], []).append(record)
        table = Table("phase", "rounds", "aggregated", "skipped", "SecAgg+ halted", "last round")
        for phase, records in phases.items():
            table.add_row(phase, str(len(records)),
                          *(str(sum(r["status"] == s for r in records))
                            for s in (RoundStatus.aggregated, RoundStatus.skipped, RoundStatus.halted)),
                          str(records[-1]["round"]))
        console.print(table)
        if (run_dir / CHECKPOINT_FILE).is_file():
            cfg = load_config(run_dir / RESOLVED_CONFIG_NAME)
            state = load_state(run_dir, cfg)
            console.print(f"checkpoint: after global round {state.global_round} "
                          f"({state.phase or 'between phases'}); resume with output.resume=true",
                          highlight=False)
            if state.ledger_json:
                for site, eps in PrivacyLedger.from_json(state.ledger_json).summary().items():
                    console.print(f"  {site}: " + ", ".join(f"{k}={v:.3f}" for k, v in eps.items()),
                                  highlight=False)


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="A finished federation's output.dir")],
           out: Annotated[Path, typer.Option("--out", help="Folder for the release bundle")]) -> None:
    """Write the run's release bundle (encoder, decoder, task models, config, model card) into
    OUT from its checkpoint, metrics and privacy ledger."""
    from rich.console import Console

    from server.release import export_release

    with user_errors():
        bundle = export_release(run_dir, out)
    Console().print(f"release written to {bundle}", highlight=False, soft_wrap=True)


Consortium = Annotated[Path, typer.Argument(help="The consortium's deployment folder (from init)")]
ConsortiumOption = Annotated[Path, typer.Option("--dir", envvar="FEDCMR_CONSORTIUM_DIR",
                                                help="The consortium's deployment folder")]


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="New deployment folder (must not hold keys yet)")],
    address: Annotated[Optional[list[str]], typer.Option(
        "--address", help="A host name or IP address hospitals dial (repeat); 127.0.0.1 and "
                          "localhost are always included")] = None,
    name: Annotated[str, typer.Option(help="The consortium's name, in its certificates")] = "FedCMR consortium",
) -> None:
    """Create a consortium: CA, SuperLink TLS certificate and key, app-signing key, folders."""
    from rich.console import Console

    from server.deployment import init_consortium

    with user_errors():
        made = init_consortium(folder, name, address or [])
    console = Console()
    console.print(f"consortium created in {folder}", highlight=False, soft_wrap=True)
    console.print(f"send to every hospital: {made.tls.ca_cert}", highlight=False, soft_wrap=True)
    console.print(f"start the SuperLink:    fedcmr-server start {folder}", highlight=False, soft_wrap=True)


@app.command()
def start(
    folder: Consortium,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every one)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's port (Fleet, Control and Runtime "
                                           "APIs)", min=1, max=65535)] = 9092,
    wait: Annotated[float, typer.Option(help="Seconds to wait for it to serve", min=1)] = 90.0,
) -> None:
    """Start the stock flower-superlink in the background: TLS, SuperNode authentication, state
    in FOLDER/state, logs in FOLDER/logs. Returns once it answers over TLS."""
    from rich.console import Console

    from server.deployment import ConsortiumDir, start_superlink

    with user_errors():
        link = start_superlink(ConsortiumDir(folder), host, port, wait)
    Console().print(f"SuperLink running (process {link.pid}) on {host}:{port}; logs in "
                    f"{folder / 'logs'}", highlight=False, soft_wrap=True)


@app.command()
def stop(folder: Consortium) -> None:
    """Stop the SuperLink started from FOLDER (its state database stays)."""
    from rich.console import Console

    from server.deployment import ConsortiumDir, stop_superlink

    with user_errors():
        ConsortiumDir(folder).require_initialised()
        stopped = stop_superlink(ConsortiumDir(folder))
    Console().print("SuperLink stopped" if stopped else "no SuperLink was running", highlight=False)


@app.command()
def admit(
    node_public_key: Annotated[Path, typer.Argument(help="The hospital's node-auth.key.pub")],
    name: Annotated[str, typer.Option("--name", help="The site's name, e.g. hospital-a")],
    folder: ConsortiumOption = Path("."),
) -> None:
    """Admit a hospital: register its SuperNode key with the running SuperLink."""
    from rich.console import Console

    from server.deployment import ConsortiumDir, admit_node

    with user_errors():
        node_id = admit_node(ConsortiumDir(folder), node_public_key, name)
    Console().print(f"admitted {name} as node {node_id}", highlight=False)


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The site's name given to admit")],
    folder: ConsortiumOption = Path("."),
) -> None:
    """Revoke a hospital: unregister its key, so the SuperLink refuses that node from now on."""
    from rich.console import Console

    from server.deployment import ConsortiumDir, revoke_node

    with user_errors():
        node_id = revoke_node(ConsortiumDir(folder), name)
    Console().print(f"revoked {name} (node {node_id})", highlight=False)


@app.command()
def nodes(folder: Consortium) -> None:
    """Admitted sites and what the SuperLink says of each (online, offline, registered)."""
    from rich.console import Console
    from rich.table import Table

    from server.deployment import ConsortiumDir, node_status, read_registry

    with user_errors():
        registry = read_registry(ConsortiumDir(folder))
        flower = {int(n["node-id"]): n for n in node_status(ConsortiumDir(folder))}
    table = Table("site", "node id", "status", "admitted", "revoked")
    for site, entry in registry.items():
        status = flower.get(int(entry["node_id"]), {}).get("status", "unknown")
        table.add_row(site, str(entry["node_id"]), status, entry["admitted"], entry.get("revoked", ""))
    Console(width=max(Console().width, 110)).print(table)


RunName = Annotated[str, typer.Option("--name", help="The run's name: its folder is runs/NAME in the "
                                                 "consortium folder")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue runs/NAME from its last checkpoint "
                                                       "(after an interruption or a pause)")]
RunOverrides = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides as key=value, e.g. federation.min_sites=3 federation.rounds=25")]


def _submit(folder: Path, preset: str, name: str, overrides: list[str], resume: bool) -> None:
    from server.deployment import ConsortiumDir, RunRequest, submit_run

    with user_errors():
        status = submit_run(ConsortiumDir(folder), RunRequest(preset, name, tuple(overrides), resume))
    raise typer.Exit(status)


@app.command()
def pretrain(
    config: Annotated[str, typer.Argument(help="Preset from configs/ or a YAML file")],
    name: RunName,
    overrides: RunOverrides = None,
    resume: Resume = False,
    folder: ConsortiumOption = Path("."),
) -> None:
    """Federated pretraining (and the federated fine-tuning CONFIG plans after it) on the
    admitted hospitals: submits FedCMR's apps to this consortium's SuperLink and streams the
    run's log; the release lands in runs/NAME/release."""
    _submit(folder, config, name, list(overrides or []), resume)


@app.command()
def finetune(
    config: Annotated[str, typer.Argument(help="Preset from configs/ or a YAML file (its "
                                               "tasks.names and federation.finetune_rounds)")],
    model: Annotated[Path, typer.Option("--model", help="The released foundation model to start "
                                                        "from (a bundle folder, e.g. runs/RUN/release)")],
    name: RunName,
    overrides: RunOverrides = None,
    resume: Resume = False,
    folder: ConsortiumOption = Path("."),
) -> None:
    """Federated fine-tuning of a released foundation model on the admitted hospitals, no
    pretraining: its encoder (and dense decoder) start every task in tasks.names."""
    from shared_model.bundle import load_bundle

    with user_errors():
        bundle = load_bundle(model)
    grid = bundle.config
    _submit(folder, config, name, [f"model.preset={grid.model.preset}", f"data.spacing_mm={grid.data.spacing_mm}",
                                   f"data.crop_px={grid.data.crop_px}", *(overrides or []), "federation.rounds=0",
                                   f"federation.foundation={bundle.root.resolve()}"], resume)


def main() -> None:
    app()
