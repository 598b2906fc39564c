"""fedcmr-sim: simulate a federation of hospital sites on one machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from shared_model.cli_common import load_cli_config, print_config, user_errors
from shared_model.config import ConfigError

app = typer.Typer(help="Simulate FedCMR federations of virtual hospital sites.",
                  no_args_is_help=True, add_completion=False)
console = Console()

Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides as key=value, e.g. federation.rounds=3 sim.sites=3")]


def _run_scenario(preset: str | Path, out: Path, overrides: list[str] | None) -> None:
    from server.app import ENCODER_FILE
    from server.metrics import METRICS_CSV, METRICS_JSON, read_records
    from shared_model.config import RESOLVED_CONFIG_NAME, save_resolved_config
    from sim.runner import run_federation
    from sim.sites import site_spec, write_site_frames

    cfg = load_cli_config(preset, overrides, out=out)
    if cfg.federation.min_sites is None:
        cfg.federation.min_sites = cfg.sim.sites
    elif cfg.federation.min_sites > cfg.sim.sites:
        raise ConfigError(f"key 'federation.min_sites': {cfg.federation.min_sites} is more "
                          f"than the {cfg.sim.sites} simulated sites (sim.sites)")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    start = time.perf_counter()
    sites_root = out / "sites"
    with console.status(f"writing {cfg.sim.sites} simulated sites"):
        for index in range(cfg.sim.sites):
            spec = site_spec(index, cfg.data.spacing_mm, cfg.data.crop_px)
            write_site_frames(sites_root / f"site-{index}" / "store", spec,
                              cfg.sim.images_per_site, cfg.seed)
    console.print(f"sites ready in {time.perf_counter() - start:.1f} s; "
                  f"federating {cfg.federation.rounds} rounds on Flower's simulation engine")
    run_federation(cfg, sites_root)
    records = read_records(out)
    aggregated = sum(r["status"] == "aggregated" for r in records)
    if aggregated < cfg.federation.rounds:
        console.print(f"[bold red]error:[/] only {aggregated} of {cfg.federation.rounds} rounds "
                      f"aggregated; see the log above and {out / METRICS_JSON}")
        raise typer.Exit(1)
    console.print(f"FedCMR simulation finished in {time.perf_counter() - start:.0f} s; outputs:")
    for name, file in (("resolved config", RESOLVED_CONFIG_NAME), ("encoder", ENCODER_FILE),
                       ("per-round metrics", METRICS_JSON), ("per-round metrics, CSV", METRICS_CSV)):
        console.print(f"  {name:24s} {out / file}", soft_wrap=True, highlight=False)

@app.command()
def demo(out: Annotated[Path, typer.Option("--out", help="Run folder to write into")] = Path("runs/demo"),
         overrides: Overrides = None) -> None:
    """Run the small default scenario (demo-cpu preset) end to end."""
    with user_errors():
        _run_scenario("demo-cpu", out, overrides)


@app.command()
def run(config: Annotated[str, typer.Argument(help="Preset name from configs/ or a YAML path")],
        out: Annotated[Path, typer.Option("--out", help="Run folder to write into")],
        overrides: Overrides = None) -> None:
    """Run the scenario described by CONFIG."""
    with user_errors():
        _run_scenario(config, out, overrides)


@app.command("config")
def show_config(config: Annotated[str, typer.Argument(help="Preset name or YAML path")] = "demo-cpu",
                overrides: Overrides = None) -> None:
    """Print the resolved config (preset + overrides), or the error that stops it."""
    with user_errors():
        print_config(load_cli_config(config, overrides))


def main() -> None:
    app()
