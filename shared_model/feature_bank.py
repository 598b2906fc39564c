"""A frozen encoder's features, computed once per augmented view of a sample and reused.

With the whole encoder frozen (``tasks.mode=linear``), what it hands the head depends only on
the augmented input, so each sample keeps up to ``tasks.feature_views`` augmented views with
their features: a step draws a view per sample, computes the ones not drawn before (augment,
then the encoder without gradients) and trains the head on the stored features. After the bank
fills, a step costs the head alone: a classifier's linear head almost nothing, a dense decoder
on the hybrid encoder about 0.7x a full step on 2 CPU cores. Views are reused, so too few of
them over-fit what one patient's frames show: with 1 labelled patient in 60 s, 16 views per
frame lost myocardium Dice against 64 (README, "Fine-tuning and prediction at a node").

A view's augmentation comes from its own generator, seeded by the session's seed and the view's
number, so what a view holds does not depend on when it was first drawn: a resumed session
trains on the same views as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared_model.tasks.base import Task, TaskData
from shared_model.tasks.models import TaskModel

# The bank's memory ceiling; a sample gets fewer views to fit, and with fewer than
# MIN_VIEWS each the bank is off (features computed every step, as without it).
MEMORY_BYTES = 2 << 30
MIN_VIEWS = 4

Augment = Callable[[Task, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FeatureBank:
    """Views (augmented input, augmented target, encoder features) per sample of ``data``."""

    def __init__(self, model: TaskModel, task: Task, data: TaskData, views: int, seed: int,
                 augment: Augment | None, device: torch.device,
                 layout: torch.memory_format = torch.contiguous_format,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        self.model, self.task, self.data = model, task, data
        self.augment, self.device, self.layout = augment, device, layout
        self.seed = seed
        self.views = views if augment is not None else 1  # without augmentation one view is all
        self._store: dict[int, tuple[torch.Tensor, ...]] = {}
        first = self._compute([0])[0]
        per_view = _nbytes(first)
        fit = memory_bytes // max(1, per_view * len(data))
        self.views = min(self.views, fit)
        if self.views < (1 if augment is None else MIN_VIEWS):
            self.views = 0
        else:
            self._store[0] = first

    @property
    def active(self) -> bool:
        return self.views > 0

    def slots(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """Which view of each sample a batch of ``batch`` trains on."""
        return torch.randint(self.views, (batch,), generator=gen)

    def _inputs(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = key // max(1, self.views)
        images, targets = self.data.inputs[index:index + 1], self.data.targets[index:index + 1]
        if self.augment is None:
            return images, targets
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + key) % (2**63 - 1))
        return self.augment(self.task, images, targets, gen)

    @torch.no_grad()
    def _compute(self, keys: list[int]) -> list[tuple[torch.Tensor, ...]]:
        pairs = [self._inputs(k) for k in keys]
        images = torch.cat([p[0] for p in pairs]).to(self.device)
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.layout)
        features = self.model.encode(images)
        targets = torch.cat([p[1] for p in pairs]).to(self.device)
        per_sample = [images.unbind(0), targets.unbind(0), *(f.unbind(0) for f in features)]
        return [tuple(parts) for parts in zip(*per_sample, strict=True)]

    def draw(self, index: torch.Tensor, slots: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Images, targets and features of ``slots`` views of samples ``index``; views never
        drawn before are computed now and kept."""
        keys = [int(i) * self.views + int(s) for i, s in zip(index, slots, strict=True)]
        missing = sorted({k for k in keys if k not in self._store})
        if missing:
            self._store.update(zip(missing, self._compute(missing), strict=True))
        parts = list(zip(*(self._store[k] for k in keys), strict=True))
        stacked = [torch.stack(p) for p in parts]
        stacked = [t.contiguous(memory_format=self.layout) if t.dim() == 4 else t for t in stacked]
        return stacked[0], stacked[1], tuple(stacked[2:])
