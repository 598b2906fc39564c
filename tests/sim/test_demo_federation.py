"""One small federation end to end (`fedcmr-sim federate`), through Flower's simulation engine."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from shared_model.config import config_from_yaml
from shared_model.ssl import build_ssl_model
from shared_model.weights import load_safetensors


def _processes_mentioning(fragment: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(fragment in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, ) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    overrides = ["ssl.local_steps=2", "ssl.batch_size=8", "federation.rounds=2",
                 "federation.finetune_rounds=0", "ssl.mae.decoder_depth=1", "ssl.mae.decoder_dim=64",
                 "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "sim", "federate", "demo-cpu", "--out", str(out),
                           "--images-per-site", "16", *overrides],
                          capture_output=True, text=True, timeout=600)
    return out, proc


def test_demo_writes_config_encoder_and_metrics(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out / "release") in proc.stdout.replace("\n", "")
    cfg = config_from_yaml((out / "config.yaml").read_text(), "config.yaml")
    assert cfg.federation.rounds == 2 and cfg.sim.sites == 2
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["status"] == "aggregated" for r in records)
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in records)
    assert "loss_mean" in records[-1]["aggregate"]
    assert (out / "metrics.csv").read_text().startswith("round,phase,kind,site")
    assert any((out / "tensorboard").iterdir())
    card = (out / "release" / "model_card.md").read_text()
    assert "sites that contributed: 2" in card


def test_aggregated_encoder_is_finite_and_trained(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0
    trained, meta = load_safetensors(out / "release" / "encoder.safetensors")
    cfg = config_from_yaml((out / "config.yaml").read_text(), "config.yaml")
    torch.manual_seed(cfg.seed)
    start = build_ssl_model(cfg).encoder.state_dict()
    assert set(trained) == set(start)
    assert all(torch.isfinite(t).all() for t in trained.values())
    moved = sum(float((trained[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    assert meta["timm_name"] == "fedcmr_vit_tiny_p8_64"


def test_no_ray_or_flower_process_outlives_the_run(demo_run) -> None:
    out, _ = demo_run
    assert _processes_mentioning(str(out)) == []
