"""What every self-supervised method provides: an encoder, a head, and one training step."""

from __future__ import annotations

import torch


class SSLModel(torch.nn.Module):
    """A pretraining model; ``encoder.*`` and ``head.*`` are the federated weights.

    Each method (one module in shared_model.ssl) subclasses it and builds its own head.
    """

    encoder: torch.nn.Module  # shared_model.encoders.Encoder
    head: torch.nn.Module

    def training_step(self, images: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for a batch of (B, 1, H, W) images, plus scalar health signals."""
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """Fraction (0..1) of the whole pretraining done, across rounds; drives schedules."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Updates outside the gradient (e.g. the EMA teacher)."""
        raise NotImplementedError

    def federated_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes the server aggregates."""
        raise NotImplementedError
