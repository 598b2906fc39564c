"""One small federation end to end (`fedcmr-sim federate`), through Flower's simulation engine."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from shared_model.config import config_from_yaml
from shared_model.phase_models import initial_ssl_model
from shared_model.weights import load_safetensors

RUN_MARKER = "FEDCMR_TEST_RUN"  # set on the run's process; every process it starts inherits it
RUN_ID = uuid.uuid4().hex


def _processes_of_run(marker: str) -> list[psutil.Process]:
    """Processes carrying the run's marker in their environment (Ray's GCS, raylet, workers and
    Flower's actors inherit it from the run; none of them carries the run folder in its command line)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    overrides = ["ssl.local_steps=2", "ssl.batch_size=8", "federation.rounds=2",
                 "federation.finetune_rounds=1", "tasks.names=[sax_seg]", "tasks.steps=1",
                 "sim.subjects_per_site=3", "sim.cine_phases=4", "sim.max_sax_slices=4",
                 "ssl.mae.decoder_depth=1", "ssl.mae.decoder_dim=64", "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "sim", "federate", "demo-cpu", "--out", str(out),
                           *overrides],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **{RUN_MARKER: RUN_ID}))
    return out, proc


def test_demo_writes_config_encoder_and_metrics(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out / "release") in proc.stdout.replace("\n", "")
    cfg = config_from_yaml((out / "config.yaml").read_text(), "config.yaml")
    assert cfg.federation.rounds == 2 and cfg.sim.sites == 2
    records = json.loads((out / "metrics.json").read_text())
    fits = [r for r in records if r["kind"] == "fit"]
    assert [(r["phase"], r["round"]) for r in fits] == [("pretrain", 1), ("pretrain", 2), ("finetune:sax_seg", 3)]
    assert all(r["status"] == "aggregated" for r in fits)
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in fits)
    assert "loss_mean" in fits[0]["aggregate"]
    evaluation = [r for r in records if r["kind"] == "evaluate"]
    assert evaluation and "dice_mean" in evaluation[-1]["aggregate"]
    assert (out / "release" / "tasks" / "sax_seg.safetensors").is_file()
    assert (out / "metrics.csv").read_text().startswith("round,phase,kind,site")
    assert any((out / "tensorboard").iterdir())
    card = (out / "release" / "model_card.md").read_text()
    assert "sites that contributed: 2" in card


def test_aggregated_encoder_is_finite_and_trained(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0
    trained, meta = load_safetensors(out / "release" / "encoder.safetensors")
    cfg = config_from_yaml((out / "config.yaml").read_text(), "config.yaml")
    start = initial_ssl_model(cfg).encoder.state_dict()
    assert set(trained) == set(start)
    assert all(torch.isfinite(t).all() for t in trained.values())
    moved = sum(float((trained[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    assert meta["timm_name"] == "fedcmr_vit_tiny_p8_64"


def test_no_ray_or_flower_process_outlives_the_run(demo_run) -> None:
    out, _ = demo_run
    assert _processes_of_run(RUN_ID) == []


def test_the_leak_check_sees_a_process_of_the_run() -> None:
    # Prepare: a stray process started with a marker, as a leaked Ray worker would carry it
    marker = uuid.uuid4().hex
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env=dict(os.environ, **{RUN_MARKER: marker}))
    try:
        # Execute
        found = _processes_of_run(marker)
    finally:
        stray.kill()
        stray.wait()
    # Assert
    assert [p.pid for p in found] == [stray.pid]
