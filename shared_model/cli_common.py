"""Pieces the three command-line tools share: loading config at the edge, clean errors."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console

from shared_model.config import ConfigError, FedCMRConfig, config_to_yaml, load_config

console = Console(stderr=True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a user can fix; imported only when something went wrong (the modules pull in torch)."""
    from client.intake.label_files import LabelFileError
    from client.intake.pipeline import IntakeError
    from client.store import StoreError
    from server.metrics import RunFileError
    from server.state import ResumeError
    from shared_model.bundle import BundleError
    from shared_model.checkpoint import CheckpointError
    from shared_model.privacy import PrivacyError
    from shared_model.weights import WeightsError
    from sim.scenario import ScenarioError

    return (ConfigError, StoreError, WeightsError, BundleError, CheckpointError, ResumeError,
            PrivacyError, ScenarioError, IntakeError, LabelFileError, RunFileError,
            FileNotFoundError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one clear line and exit status 2 (no traceback)."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


def load_cli_config(preset: str | Path | None, overrides: Sequence[str] | None,
                    out: Path | None = None) -> FedCMRConfig:
    """Preset + ``key=value`` overrides (+ ``--out`` as output.dir), validated."""
    items = list(overrides or [])
    if out is not None:
        items.append(f"output.dir={out}")
    return load_config(preset, items)


def print_config(cfg: FedCMRConfig) -> None:
    Console().print(config_to_yaml(cfg), end="", markup=False, highlight=False)


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
