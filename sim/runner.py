"""Run a federation of simulated sites on Flower's simulation engine (Ray backend).

The sites are ordinary FedCMR nodes: each has a local store and runs the same ClientApp a
hospital runs; the ServerApp is the consortium's. Only the engine differs from a deployment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from shared_model.config import FedCMRConfig

if TYPE_CHECKING:
    from flwr.app import Context

    from server.run_status import Outcome

log = logging.getLogger(__name__)


# Ray puts AF_UNIX sockets ~70 characters below its temp dir; the kernel allows 107 in all.
RAY_TMPDIR_MAX_CHARS = 36
RAY_EXIT_S = 30.0  # how long Ray's processes get to exit after shutdown


@contextlib.contextmanager
def ray_tmpdir(run_dir: Path) -> Iterator[Path]:
    """``run_dir/.ray`` when its path is short enough for Ray's sockets, else a short /tmp one."""
    local = (run_dir / ".ray").resolve()
    if len(str(local)) <= RAY_TMPDIR_MAX_CHARS:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    short = Path(tempfile.mkdtemp(prefix="fedcmr-ray-"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@contextlib.contextmanager
def flower_environment(run_dir: Path) -> Iterator[Path]:
    """Run-local Flower/Ray folders, no runtime dependency installs; restored afterwards.
    Yields Ray's temp folder, which every Ray process of the run carries as RAY_TMPDIR."""
    with ray_tmpdir(run_dir) as ray_dir, _environment(run_dir, ray_dir):
        yield ray_dir


@contextlib.contextmanager
def _environment(run_dir: Path, ray_dir: Path) -> Iterator[None]:
    settings = {
        "FLWR_HOME": str(run_dir / ".flwr"),
        "RAY_TMPDIR": str(ray_dir),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "TIMM_FUSED_ATTN": os.environ.get("TIMM_FUSED_ATTN", "0"),
        "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    previous = {k: os.environ.get(k) for k in settings}
    Path(settings["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_federation(cfg: FedCMRConfig, sites_root: Path, extra_mods: list | None = None,
                   phases: list | None = None, release: bool = True) -> Outcome:
    """Federate ``cfg.sim.sites`` simulated nodes whose stores live under ``sites_root``.

    Returns how the run ended (its ``status.json``: released, finished, paused or stopped, and
    why).
    ``extra_mods`` are added to every node's ClientApp (fault injection in tests).
    """
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from client.node_settings import NodeSettings, simulated_node_settings
    from server.app import build_server_app
    from server.run_status import read_outcome

    def settings_for(context: Context) -> NodeSettings:
        return simulated_node_settings(sites_root, int(context.node_config["partition-id"]),
                                       device=cfg.device, threads=max(1, int(cfg.sim.cpus_per_site)))

    run_dir = Path(cfg.output.dir)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.sim.cpus_per_site, "num_gpus": 0.0},
        # Ray's own services bind the loopback address only (its default is the host's routable IP).
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                      "configure_logging": False, "_node_ip_address": "127.0.0.1"},
    }
    with flower_environment(run_dir) as ray_dir:
        try:
            run_simulation(server_app=build_server_app(cfg, phases, release),
                           client_app=build_client_app(settings_for, extra_mods),
                           num_supernodes=cfg.sim.sites, backend_config=backend_config)
        finally:
            _stop_ray(ray_dir)
    outcome = read_outcome(run_dir)
    if outcome is None:
        raise RuntimeError(f"the federation ended without a status; see the log above ({run_dir})")
    return outcome


def _stop_ray(ray_dir: Path) -> None:
    """Ray is Flower's to stop; make sure of it even when the run failed midway, and wait until
    the run's Ray processes (GCS, raylet, workers, Flower's actors) have exited: shutdown
    returns while workers are still winding down, and the next run would share the cores.

    Flower's backend shuts Ray down itself, leaving the workers to the init process; they are
    found by the RAY_TMPDIR they inherited, which is this run's own folder.
    """
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(_ray_processes(ray_dir), timeout=RAY_EXIT_S)
    for proc in alive:
        log.warning("Ray process %d did not exit after shutdown; killing it", proc.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _ray_processes(ray_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == str(ray_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
