"""Local training loops: device choice, seeded batches, bf16 autocast on GPU.

A loop trains what it is given on the tensors it is given; it neither reads configuration files
nor talks to Flower.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from shared_model.ssl.base import SSLModel


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was requested but CUDA is not available; "
                           "set device=cpu or device=auto")
    return device


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (run seed, site, round, ...)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*parts: int | str) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*parts))
    return gen


class BatchSampler:
    """Mini-batches of indices: shuffled epochs drawn from a generator, never the clock."""

    def __init__(self, num_items: int, batch_size: int, gen: torch.Generator) -> None:
        if num_items < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.gen = gen
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while self._order.numel() < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.num_items, generator=self.gen)])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return batch


@dataclass
class LocalResult:
    """What a round of local training reports (scalars only)."""

    steps: int
    images_seen: int
    seconds: float
    loss_first: float
    loss_last: float
    loss_mean: float
    stats: dict[str, float] = field(default_factory=dict)


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context on the CPU (fp32 there)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def pretrain_local(model: SSLModel, images: torch.Tensor, *, steps: int, batch_size: int,
                   optimizer: torch.optim.Optimizer, gen: torch.Generator,
                   device: torch.device) -> LocalResult:
    """``steps`` optimiser steps of the model's self-supervised objective on ``images``.

    ``images`` is a (N, 1, H, W) float tensor at the encoder's input size; it stays on the CPU
    and batches move to ``device`` as they are drawn.
    """
    model.train()
    sampler = BatchSampler(images.shape[0], batch_size, gen)
    losses: list[float] = []
    totals: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        batch = images[sampler.next()].to(device, non_blocking=True)
        with autocast_for(device):
            loss, stats = model.training_step(batch, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at local step {step}; lower ssl.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step, steps)
        losses.append(float(loss.detach()))
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    seconds = time.perf_counter() - start
    return LocalResult(
        steps=steps, images_seen=steps * sampler.batch_size, seconds=seconds,
        loss_first=losses[0], loss_last=losses[-1], loss_mean=sum(losses) / len(losses),
        stats={k: v / steps for k, v in totals.items()},
    )


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        flat = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", "reg_token"))
        (no_decay if flat else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
