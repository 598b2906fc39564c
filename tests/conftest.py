"""Shared fixtures: small configs and a quiet, run-local Flower/Ray environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The smallest settings that still exercise every piece of a pretraining round."""
    return ["ssl.local_steps=2", "ssl.batch_size=8", "sim.images_per_site=16",
            "ssl.mae.decoder_depth=1", "ssl.mae.decoder_dim=64"]
