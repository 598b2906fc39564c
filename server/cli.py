"""fedcmr-server: the consortium's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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


def main() -> None:
    app()
