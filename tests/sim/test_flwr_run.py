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

from client.node_settings import simulated_site_store
from sim.sites import site_spec, write_site_frames

REPO = Path(__file__).resolve().parents[2]


def _stop_processes_mentioning(fragment: str) -> int:
    stopped = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(fragment in part for part in proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except psutil.TimeoutExpired:
                    proc.kill()
                stopped += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return stopped


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
                  "overrides='ssl.local_steps=1 ssl.batch_size=8 federation.min_sites=2 device=cpu federation.finetune_rounds=0'")
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
    # Assert
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "release" / "encoder.safetensors").is_file(), proc.stdout[-2000:]
    assert (out / "metrics.json").is_file()
    assert _stop_processes_mentioning(str(flwr_home)) == 0
    assert not (REPO / "pyproject.toml").read_text().count("MIGRATION")
