"""fedcmr-server: the consortium's command line."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from shared_model.cli_common import load_cli_config, print_config, print_presets, user_errors

app = typer.Typer(help="FedCMR consortium server: federated rounds, privacy budget, release.",
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


def main() -> None:
    app()
