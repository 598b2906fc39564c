"""Shared fixtures: small configs and a quiet, run-local Flower/Ray environment."""

from __future__ import annotations

import os

os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from tests.reliability import (  # noqa: E402,F401  (the reliability table's hooks)
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_terminal_summary,
)
