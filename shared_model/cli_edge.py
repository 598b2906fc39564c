"""The command-line edge the three tools share (fedcmr-client, fedcmr-server, fedcmr-sim).

It sits in shared_model because that is the only package all three command lines may import
(server imports nothing from client, and neither imports sim), and it stays an edge: only the
three ``cli`` modules import it (tests/test_import_graph.py checks), and it imports nothing of
the ML code until a command runs, so a tool starts fast.

What it holds: the config as the command line gives it (preset, ``key=value`` overrides,
``--out``), :class:`~shared_model.errors.UserError` as one line and exit status 2, and the
``config`` and ``presets`` sub-commands every tool has.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from shared_model.config import FedCMRConfig, config_to_yaml, load_config
from shared_model.errors import UserError

# Idle OpenMP threads sleep instead of spinning (set before torch loads; a user's own setting
# wins): on a busy 2-core node a spinning thread holds the core its partner needs, and a
# training step takes ~10x as long (measured). Processes the tools start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

error_console = Console(stderr=True)

Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides as key=value, e.g. federation.rounds=3")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one clear line and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as exc:
        error_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


def load_cli_config(preset: str | Path | None, overrides: Sequence[str] | None,
                    out: Path | None = None) -> FedCMRConfig:
    """Preset + ``key=value`` overrides (+ ``--out`` as output.dir), validated."""
    items = list(overrides or [])
    if out is not None:
        items.append(f"output.dir={out}")
    return load_config(preset, items)


def add_config_commands(app: typer.Typer) -> None:
    """Register ``config`` (print the resolved config) and ``presets`` (the encoder presets)."""

    @app.command("config")
    def show_config(config: Annotated[str, typer.Argument(help="Preset name or YAML path")] = "demo-cpu",
                    overrides: Overrides = None) -> None:
        """Print the resolved config (preset + overrides), or the error that stops it."""
        with user_errors():
            cfg = load_cli_config(config, overrides)
        Console().print(config_to_yaml(cfg), end="", markup=False, highlight=False)

    @app.command()
    def presets() -> None:
        """List the encoder presets and their timm names."""
        print_presets()


def print_presets() -> None:
    """The encoder presets, with what plain timm needs to rebuild each."""
    from rich.table import Table

    from shared_model.encoders import PRESETS, build_encoder, count_parameters

    table = Table(title="encoder presets")
    for column in ("preset", "timm name", "image px", "patch px", "width", "depth", "parameters"):
        table.add_column(column)
    for p in PRESETS.values():
        table.add_row(p.name, p.timm_name, str(p.image_size), str(p.patch_size), str(p.embed_dim),
                      str(p.depth), f"{count_parameters(build_encoder(p)) / 1e6:.1f} M")
    Console(width=max(Console().width, 110)).print(table)
