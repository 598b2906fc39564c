"""The same apps under plain `flwr run` (local SuperLink, simulation runtime)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from client.federated import ssl_frames, store_holdout
from client.node_settings import simulated_site_store
from client.store import LocalStore
from server.metrics import RecordKind, read_records
from server.run_status import RunStatus, read_outcome
from shared_model.config import config_from_yaml
from shared_model.encoders import get_preset
from shared_model.weights import load_safetensors
from sim.sites import site_spec, write_site_frames

REPO = Path(__file__).resolve().parents[2]


def _stop_processes_mentioning(fragment: str) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(fragment in part for part in proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except psutil.TimeoutExpired:
                    proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@pytest.mark.skipif(shutil.which("flwr", path=str(Path(sys.executable).parent)) is None,
                    reason="flwr CLI not installed beside this Python")
def test_flwr_run_uses_the_project_apps(tmp_path: Path) -> None:
    # Prepare: two site stores and a private Flower home.
    for index in range(2):
        write_site_frames(simulated_site_store(tmp_path / "sites", index),
                          site_spec(index, 1.5, 128), num_images=16, seed=0)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    ray_dir = Path(tempfile.mkdtemp(prefix="fr-"))  # Ray's socket paths must stay short
    bin_dir = str(Path(sys.executable).parent)  # flwr starts flower-superlink from PATH
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_HOME=str(flwr_home), RAY_TMPDIR=str(ray_dir),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    out = tmp_path / "out"
    run_config = (f"sim-root='{tmp_path / 'sites'}' out-dir='{out}' "
                  "overrides='ssl.local_steps=1 ssl.batch_size=8 federation.min_sites=2 device=cpu "
                  "federation.finetune_rounds=0'")
    flwr = str(Path(sys.executable).parent / "flwr")
    # Execute
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "local", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    finally:
        # `flwr run` leaves a detached local SuperLink running: stop it.
        _stop_processes_mentioning(str(flwr_home))
        shutil.rmtree(ray_dir, ignore_errors=True)
    # Assert: Flower ran the project's ServerApp with the run config, over the ClientApp at two
    # sites whose stores it found under sim-root
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cfg = config_from_yaml((out / "config.yaml").read_text(), "config.yaml")
    assert (cfg.output.dir, cfg.ssl.local_steps, cfg.federation.min_sites) == (str(out), 1, 2)
    outcome = read_outcome(out)
    assert outcome is not None and outcome.status == RunStatus.released
    fits = [r for r in read_records(out) if r["kind"] == RecordKind.fit]
    assert len(fits) == cfg.federation.rounds and all(set(r["sites"]) == {"site-0", "site-1"} for r in fits)
    size = get_preset(cfg.model.preset).image_size
    stores = {f"site-{i}": LocalStore.open(simulated_site_store(tmp_path / "sites", i)) for i in range(2)}
    frames = {site: len(ssl_frames(store, size, store_holdout(store, cfg))) for site, store in stores.items()}
    assert all(m["num_images"] == frames[site] for r in fits for site, m in r["sites"].items())
    _, meta = load_safetensors(out / "release" / "encoder.safetensors")
    assert meta["timm_name"] == get_preset(cfg.model.preset).timm_name
