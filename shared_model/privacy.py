"""Sample-level differential privacy at a node: Opacus DP-SGD with a persistent accountant.

The model is wrapped for per-sample gradients (timm's ViT goes through Opacus' functorch path:
it owns ``cls_token``/``pos_embed`` directly, so Opacus treats the whole encoder as one layer),
batches are Poisson-sampled, and every step is recorded by the accountant. The accountant's
history is plain JSON so it can sit in a checkpoint and be restored after a restart: epsilon
after a resume equals epsilon of an uninterrupted run.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared_model.errors import UserError


def _opacus():  # noqa: ANN202
    """Import Opacus without its side effect: it calls logging.basicConfig at import, which
    would print every library's debug records through a new root handler."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus
    import opacus.validators  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return opacus


class PrivacyError(UserError, ValueError):
    """A model or setting DP-SGD cannot honour; the message says what to change."""


@dataclass
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str = "prv"
    # False (always in a deployment): noise and Poisson sampling draw from a generator seeded
    # from the OS's entropy at the node, so nobody who knows the plan's seed (which a release
    # publishes) can predict and subtract the noise. True only in simulations that must
    # reproduce their numbers; the model card says so.
    reproducible_noise: bool = False


def private_generator(settings: DPSettings, seeded: torch.Generator) -> torch.Generator:
    """The generator DP-SGD's noise and sampling draw from (see ``reproducible_noise``)."""
    if settings.reproducible_noise:
        return seeded
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63))
    return gen


@dataclass
class PrivateTraining:
    """What ``make_private`` returns: wrapped model/optimizer/loader and the engine."""

    model: Any  # opacus.GradSampleModule around the model
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    engine: Any  # opacus.PrivacyEngine
    settings: DPSettings

    def epsilon(self) -> float:
        return float(self.engine.accountant.get_epsilon(delta=self.settings.delta)) \
            if self.engine.accountant.history else 0.0

    def accountant_state(self) -> list[list[float]]:
        """JSON-ready history: [noise_multiplier, sample_rate, steps] per entry."""
        return [[float(n), float(q), int(s)] for n, q, s in self.engine.accountant.history]

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample buffers from the underlying model."""
        self.model._close()  # GradSampleModule API: hooks off, grad_sample attributes gone


def check_dp_compatible(model: torch.nn.Module) -> None:
    """Opacus' strict validation (e.g. no BatchNorm); a clear error instead of a silent fix."""
    errors = _opacus().validators.ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"the model cannot train under DP-SGD: {errors[:3]}")


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataset: torch.utils.data.TensorDataset, batch_size: int, settings: DPSettings,
                 gen: torch.Generator, history: list[list[float]] | None = None) -> PrivateTraining:
    """Wrap for DP-SGD; ``history`` restores a previous accountant state (after a resume)."""
    check_dp_compatible(model)
    if len(dataset) < 2:
        raise PrivacyError("DP-SGD needs at least 2 training samples")
    engine = _opacus().PrivacyEngine(accountant=settings.accountant)
    if history:
        engine.accountant.history = [(float(n), float(q), int(s)) for n, q, s in history]
    gen = private_generator(settings, gen)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)),
                                         generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG; documented choice
        private_model, private_opt, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            noise_generator=gen)
    return PrivateTraining(private_model, private_opt, private_loader, engine, settings)


def history_rows(value: object) -> list[list[float]] | None:
    """An accountant history read from a file, as ``[noise multiplier, sample rate, steps]``
    rows; None when ``value`` is not a list of such rows."""
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 3 and all(isinstance(v, (int, float)) for v in r)
            for r in value):
        return None
    return [[float(n), float(q), int(s)] for n, q, s in value]


def epsilon_for(history: list[list[float]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a stored accountant history (for ledgers and reports)."""
    if not history:
        return 0.0
    engine = _opacus().PrivacyEngine(accountant=accountant)
    engine.accountant.history = [(float(n), float(q), int(s)) for n, q, s in history]
    with np.errstate(divide="ignore", invalid="ignore"):  # PRV's log(1 - q) at q = 1
        return float(engine.accountant.get_epsilon(delta=delta))
