"""Local training loops: device choice, seeded batches, bf16 autocast on GPU, gradient
accumulation, and checkpoints that let a session resume mid-way with the same numbers.

A loop trains what it is given on the tensors it is given; it neither reads configuration files
nor talks to Flower. :func:`run_steps` is the one engine; :func:`pretrain_local` (SSL) and
``shared_model.finetune.finetune`` (tasks) are thin wrappers around it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared_model.checkpoint import CheckpointError, LoopState, load_loop_state, save_loop_state
from shared_model.errors import UserError
from shared_model.privacy import PrivateTraining
from shared_model.ssl.base import SSLModel


class DeviceError(UserError, RuntimeError):
    """A device the config asks for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' was requested but CUDA is not available; "
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
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while self.order.numel() < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.num_items, generator=self.gen)])
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return batch


class ForegroundBatchSampler(BatchSampler):
    """Shuffled epochs, with a share of every batch forced to hold a foreground class.

    As nnU-Net oversamples foreground: the last ``round(fraction * batch_size)`` items of a
    batch are drawn by picking one of ``groups`` uniformly (a class: the indices of the items
    that hold it) and then an item of it uniformly, so a class that few frames show (the
    myocardium of two cine studies among blood-pool-only patients) is in nearly every batch.
    The rest of the batch walks the shuffled epoch. Every draw comes from ``gen``, so a resumed session
    draws the same batches.
    """

    def __init__(self, num_items: int, batch_size: int, gen: torch.Generator,
                 groups: Sequence[torch.Tensor], fraction: float) -> None:
        super().__init__(num_items, batch_size, gen)
        self.groups = [g.long() for g in groups if g.numel() > 0]
        self.forced = round(fraction * self.batch_size) if self.groups else 0
        self.batch_size -= self.forced

    def next(self) -> torch.Tensor:
        uniform = super().next()
        if not self.forced:
            return uniform
        picks = torch.randint(len(self.groups), (self.forced,), generator=self.gen).tolist()
        forced = [self.groups[g][int(torch.randint(self.groups[g].numel(), (1,), generator=self.gen))]
                  for g in picks]
        return torch.cat([uniform, torch.stack(forced)])


class TensorBatches:
    """Batches drawn from in-memory tensors that share their first dimension (with
    ``groups``, a ``foreground_fraction`` of each batch drawn from them: ForegroundBatchSampler)."""

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, gen: torch.Generator,
                 groups: Sequence[torch.Tensor] = (), foreground_fraction: float = 0.0) -> None:
        self.tensors = list(tensors)
        items = int(self.tensors[0].shape[0])
        self.sampler = (ForegroundBatchSampler(items, batch_size, gen, groups, foreground_fraction)
                        if groups and foreground_fraction > 0 else BatchSampler(items, batch_size, gen))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            index = self.sampler.next()
            yield tuple(t[index] for t in self.tensors)

    @property
    def order(self) -> torch.Tensor:
        return self.sampler.order

    @order.setter
    def order(self, value: torch.Tensor) -> None:
        self.sampler.order = value.long()


class LoaderBatches:
    """Batches from a DataLoader (Opacus' Poisson sampler), cycled; empty batches skipped."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.order = torch.empty(0, dtype=torch.long)

    MAX_EMPTY_IN_A_ROW = 1000

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        empty = 0
        while True:
            for batch in self.loader:
                if len(batch[0]) > 0:
                    empty = 0
                    yield tuple(batch)
                else:
                    empty += 1
                    if empty >= self.MAX_EMPTY_IN_A_ROW:
                        raise ValueError(f"DP-SGD's Poisson sampling drew {empty} empty batches in a "
                                         "row; raise the batch size (the sample rate) or add samples")


def learning_rate(base_lr: float, progress: float, warmup: float = 0.05,
                  floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` of training, then cosine decay to ``floor * base_lr``."""
    if progress < warmup:
        return base_lr * max(progress, 1e-3) / warmup
    rest = (progress - warmup) / max(1 - warmup, 1e-8)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(rest, 1.0))))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class Span:
    """The part of a whole training run that one local session covers, as fractions 0..1.

    In a federation, round r of R covers ((r-1)/R, r/R): schedules run over all rounds.
    """

    start: float = 0.0
    end: float = 1.0

    def at(self, step: float, steps: int) -> float:
        return self.start + (self.end - self.start) * step / max(steps, 1)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Save the loop every ``every`` steps to ``path``; resume from it when it exists.

    ``fingerprint`` names the session (e.g. task, round, seed): a checkpoint of another
    session is refused rather than silently continued.
    """

    path: Path
    every: int = 50
    fingerprint: str = ""


@dataclass
class LocalResult:
    """What a local session reports (scalars only)."""

    steps: int
    images_seen: int
    seconds: float
    loss_first: float
    loss_last: float
    loss_mean: float
    stats: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context on the CPU (fp32 there)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


StepFn = Callable[[tuple[torch.Tensor, ...], float], tuple[torch.Tensor, dict[str, float]]]


def run_steps(model: torch.nn.Module, batches: TensorBatches | LoaderBatches, step_fn: StepFn, *,
              optimizer: torch.optim.Optimizer, steps: int, base_lr: float, device: torch.device,
              gen: torch.Generator, span: Span = Span(), accumulate: int = 1,
              before_step: Callable[[int, float], None] | None = None,
              after_step: Callable[[int, float], None] | None = None,
              checkpoint: CheckpointPolicy | None = None,
              dp_history: Callable[[], list[list[float]]] | None = None,
              max_seconds: float | None = None) -> LocalResult:
    """The training engine: ``steps`` optimiser steps, each over ``accumulate`` micro-batches.

    ``step_fn(batch, progress)`` returns (loss, stats) for a batch already on ``device``.
    With ``max_seconds`` the session also ends when its training time reaches the budget, and
    the schedule's progress is the larger of the step and the time fractions (a slow machine
    takes fewer steps through the same schedule). With ``checkpoint``, the loop resumes from its
    file (time spent included) and saves to it every ``every`` steps and at the end.
    """
    state = _resume(checkpoint, model, optimizer, gen, batches)
    batch_iter = iter(batches)  # after the resume: the restored batch order comes first
    first_step = state.step if state else 0
    losses = list(state.losses) if state else []
    totals: dict[str, float] = {}
    images = 0
    clock = SessionClock(max_seconds, state.seconds if state else 0.0)
    start = time.perf_counter()
    done = 0
    for step in range(first_step, steps):
        if clock.expired():
            break
        progress = span.at(step, steps) if max_seconds is None else span.at(
            clock.fraction(step, steps), 1)
        if before_step is not None:
            before_step(step, progress)
        set_learning_rate(optimizer, learning_rate(base_lr, progress))
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            batch = tuple(t.to(device, non_blocking=True) for t in next(batch_iter))
            images += int(batch[0].shape[0])
            with autocast_for(device):
                loss, stats = step_fn(batch, progress)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}; lower the learning rate")
            (loss / accumulate).backward()
            losses.append(float(loss.detach()))
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / accumulate
        optimizer.step()
        if after_step is not None:
            after_step(step, progress)
        done += 1
        if checkpoint and ((step + 1) % checkpoint.every == 0 or step + 1 == steps
                           or clock.expired()):
            _save(checkpoint, step + 1, model, optimizer, gen, batches, losses, dp_history,
                  clock.spent())
    return LocalResult(
        steps=done, images_seen=images, seconds=time.perf_counter() - start,
        loss_first=losses[0] if losses else math.nan, loss_last=losses[-1] if losses else math.nan,
        loss_mean=sum(losses) / len(losses) if losses else math.nan,
        stats={k: v / max(done, 1) for k, v in totals.items()}, resumed_from=first_step)


class SessionClock:
    """Training time of a session against its budget (seconds), across resumes."""

    def __init__(self, budget: float | None, already: float = 0.0) -> None:
        self.budget = budget
        self.already = already
        self.start = time.perf_counter()

    def spent(self) -> float:
        return self.already + time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.budget is not None and self.spent() >= self.budget

    def fraction(self, step: int, steps: int) -> float:
        """Progress through the session: steps done or budget spent, whichever is further."""
        by_time = self.spent() / self.budget if self.budget else 0.0
        return min(1.0, max(step / max(steps, 1), by_time))


def _resume(policy: CheckpointPolicy | None, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, gen: torch.Generator,
            batches: TensorBatches | LoaderBatches) -> LoopState | None:
    if policy is None or not policy.path.exists():
        return None
    state = load_loop_state(policy.path)
    if state.fingerprint != policy.fingerprint:
        raise CheckpointError(f"{policy.path} belongs to session '{state.fingerprint}', not "
                              f"'{policy.fingerprint}'; move it away to start this session")
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    gen.set_state(state.generator)
    batches.order = state.batch_order
    return state


def _save(policy: CheckpointPolicy, step: int, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, gen: torch.Generator,
          batches: TensorBatches | LoaderBatches, losses: list[float],
          dp_history: Callable[[], list[list[float]]] | None, seconds: float = 0.0) -> None:
    save_loop_state(policy.path, LoopState(
        step=step, model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(), generator=gen.get_state(),
        batch_order=batches.order.clone(), losses=losses,
        dp_history=dp_history() if dp_history else [], fingerprint=policy.fingerprint,
        seconds=seconds))


class ProximalTerm:
    """FedProx: ``mu / 2 * ||w - w_global||^2`` over the trainable weights at session start."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.params = {n: p for n, p in model.named_parameters() if n in self.reference}

    def __call__(self) -> torch.Tensor:
        total = sum(((p - self.reference[n]) ** 2).sum() for n, p in self.params.items())
        return 0.5 * self.mu * total  # type: ignore[return-value]


def pretrain_local(model: SSLModel, images: torch.Tensor, *, steps: int, batch_size: int,
                   optimizer: torch.optim.Optimizer, gen: torch.Generator,
                   device: torch.device, base_lr: float, span: Span = Span(),
                   accumulate: int = 1, checkpoint: CheckpointPolicy | None = None,
                   proximal_mu: float = 0.0, private: PrivateTraining | None = None) -> LocalResult:
    """``steps`` optimiser steps of the model's self-supervised objective on ``images``.

    ``images`` is a (N, 1, H, W) float tensor at the encoder's input size; it stays on the CPU
    and batches move to ``device`` as they are drawn. The learning rate follows
    :func:`learning_rate` over the whole run, of which this session covers ``span``. With
    ``private`` (from shared_model.privacy.make_private over ``model`` and ``images``), batches
    are Poisson-sampled and gradients clipped and noised per image.
    """
    model.train()
    prox = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None

    def step_fn(batch: tuple[torch.Tensor, ...], progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        model.set_progress(progress)
        # under DP too: Opacus' per-sample hooks sit on the model's own layers, and its wrapper
        # forwards only forward(), not the objective
        loss, stats = model.training_step(batch[0], gen)
        return (loss + prox() if prox else loss), stats

    batches = LoaderBatches(private.loader) if private else TensorBatches([images], batch_size, gen)
    return run_steps(private.model if private else model, batches, step_fn,
                     optimizer=private.optimizer if private else optimizer, steps=steps,
                     base_lr=base_lr, device=device, gen=gen, span=span,
                     accumulate=1 if private else accumulate,
                     after_step=lambda step, progress: model.after_optimizer_step(),
                     checkpoint=checkpoint,
                     dp_history=private.accountant_state if private else None)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", "reg_token"))
