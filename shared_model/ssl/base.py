"""What every self-supervised method provides: an encoder, a head, and one training step."""

from __future__ import annotations

from typing import Protocol

import torch


class SSLModel(Protocol):
    """A pretraining model; ``encoder.*`` and ``head.*`` are the federated weights."""

    encoder: torch.nn.Module  # shared_model.encoders.Encoder
    head: torch.nn.Module

    def training_step(self, images: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for a batch of (B, 1, H, W) images, plus scalar health signals."""
        ...

    def set_progress(self, progress: float) -> None:
        """Fraction (0..1) of the whole pretraining done, across rounds; drives schedules."""
        ...

    def after_optimizer_step(self) -> None:
        """Updates outside the gradient (e.g. the EMA teacher)."""
        ...

    def federated_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes the server aggregates."""
        ...

    def parameters(self, recurse: bool = True):  # noqa: ANN201 - nn.Module's signature
        ...

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        ...
