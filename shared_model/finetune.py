"""Fine-tuning a task model on a node's labelled samples, and evaluating it.

Modes (``tasks.mode``): ``linear`` trains the head on a frozen encoder; ``stem`` also trains the
encoder's convolutional stem, through the dense decoder's skips only (the transformer frozen and
not back-propagated through), at the decoder's rate; ``auto`` is ``stem`` with enough labelled
subjects for it (:data:`STEM_MIN_SUBJECTS`), else ``linear``; ``full`` trains all with
layer-wise learning-rate decay (encoder block i gets ``lr * decay**(depth - i)``, the
embeddings ``lr * decay**(depth + 1)``); ``frozen_then_unfrozen`` trains the head alone for the
first ``frozen_fraction`` of the steps, then everything. Optional DP-SGD (Opacus) for
``linear``, ``stem``, ``auto`` and ``full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import torch

from shared_model.augment import (
    CLASSIFICATION_GEOMETRY,
    LANDMARK_GEOMETRY,
    SEGMENTATION_GEOMETRY,
    ViewSpec,
    affine_points,
    apply_affine,
    random_geometry,
    random_intensity,
)
from shared_model.config import FinetuneMode, TasksConfig
from shared_model.encoders import ConvStem
from shared_model.feature_bank import FeatureBank
from shared_model.privacy import DPSettings, PrivacyError, make_private
from shared_model.tasks.base import Task, TaskData, TaskDataError, TaskKind
from shared_model.tasks.models import DensePredictor, TaskModel
from shared_model.tasks.scoring import predict, task_loss, task_metrics
from shared_model.train import (
    CheckpointPolicy,
    LoaderBatches,
    LocalResult,
    ProximalTerm,
    Span,
    TensorBatches,
    is_no_decay,
    run_steps,
)

# Between scanners and protocols: gamma, contrast, brightness and noise (segmentation wider:
# it must hold on exports of other vendors than the labelled one).
FINETUNE_INTENSITY = ViewSpec(size=0, gamma=(0.8, 1.25), contrast=(0.85, 1.15), brightness=0.05,
                              noise_std=0.02)
SEGMENTATION_INTENSITY = ViewSpec(size=0, gamma=(0.7, 1.5), contrast=(0.75, 1.25), brightness=0.1,
                                  noise_std=0.03)
GEOMETRY = {TaskKind.segmentation: SEGMENTATION_GEOMETRY, TaskKind.landmarks: LANDMARK_GEOMETRY}

# How a randomly initialised encoder (the "scratch" baseline) fine-tunes: it has nothing to keep,
# so everything trains, at one learning rate (layer-wise decay would slow its stem and first
# blocks to a fraction of the head's, a handicap and not a baseline).
SCRATCH_RECIPE = ("tasks.mode=full", "tasks.layer_decay=1.0")

# tasks.mode=auto trains the conv stem from this many labelled subjects on. Measured on real
# patients (120 s, 3 seeds, README): the stem at the decoder's rate gained +3.5 blood-pool and
# +9.2 myocardium Dice points over the frozen stem with 3 subjects, +3.3 and +5.6 with 2; with 1
# it lost 10.8 and 8.1: one study's frames are too few to train a stem on (a decoder's own copy
# of it, the transformer's tokens left as pretrained, lost as much).
STEM_MIN_SUBJECTS = 2


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for encoder block i, depth + 1 for the final norm and the head."""
    if name.startswith("encoder."):
        rest = name[len("encoder."):]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def has_encoder(model: torch.nn.Module) -> TypeGuard[TaskModel]:
    """Foundation-model task models have an ``encoder``; the supervised U-Net has none."""
    return isinstance(model, TaskModel)


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups carrying ``lr_scale`` (layer-wise decay) and their weight decay."""
    if not has_encoder(model):
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if is_no_decay(name, param) else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name.removeprefix("_module."), depth)
        flat = is_no_decay(name, param)
        group = groups.setdefault((lid, flat), {
            "params": [], "weight_decay": 0.0 if flat else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - lid)})
        group["params"].append(param)
    return list(groups.values())


def mode_param_groups(model: torch.nn.Module, settings: TasksConfig,
                      mode: FinetuneMode) -> list[dict]:
    """The trainable parameters' groups for ``mode``: layer-wise decay protects a transformer
    that trains; in stem mode none of it does, and the stem trains as the decoder's encoding
    path, at the decoder's rate."""
    decay = 1.0 if mode == FinetuneMode.stem else settings.layer_decay
    return param_groups(model, settings.weight_decay, decay)


def resolved_mode(mode: FinetuneMode, model: torch.nn.Module, data: TaskData) -> FinetuneMode:
    """What ``mode`` trains on ``data``: a model without an encoder (the U-Net) trains whole;
    ``auto`` is ``stem`` for a dense task whose encoder has a conv stem and whose data holds at
    least :data:`STEM_MIN_SUBJECTS` labelled subjects, else ``linear``."""
    if not has_encoder(model):
        return FinetuneMode.full
    if mode != FinetuneMode.auto:
        return mode
    enough = len(set(data.subjects)) >= STEM_MIN_SUBJECTS
    return FinetuneMode.stem if enough and trainable_stem(model) is not None else FinetuneMode.linear


def set_encoder_trainable(model: torch.nn.Module, trainable: bool) -> None:
    if has_encoder(model):
        model.encoder.requires_grad_(trainable)


def trainable_stem(model: torch.nn.Module) -> ConvStem | None:
    """The conv stem ``tasks.mode=stem`` trains: a dense task's, whose decoder takes its skips
    (a classifier's head never sees them, so there the mode is ``linear``)."""
    if isinstance(model, DensePredictor) and isinstance(model.encoder.patch_embed, ConvStem):
        return model.encoder.patch_embed
    return None


def augment_batch(task: Task, inputs: torch.Tensor, targets: torch.Tensor,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rotation/zoom/shift (and, for segmentation, mirror) for image and label, plus
    intensity changes; how wide each is depends on the task's kind."""
    frames = inputs.flatten(0, 1) if task.kind == TaskKind.bag_classification else inputs
    theta = random_geometry(frames.shape[0], GEOMETRY.get(task.kind, CLASSIFICATION_GEOMETRY), gen)
    intensity = SEGMENTATION_INTENSITY if task.kind == TaskKind.segmentation else FINETUNE_INTENSITY
    frames = random_intensity(apply_affine(frames, theta), intensity, gen)
    if task.kind == TaskKind.segmentation:
        targets = apply_affine(targets[:, None].float(), theta, mode="nearest")[:, 0].long()
    elif task.kind == TaskKind.landmarks:
        targets = affine_points(targets, theta, *frames.shape[-2:])
    return frames.view_as(inputs), targets


def absent_where_never_drawn(task: Task, data: TaskData) -> TaskData:
    """Segmentation classes that no training frame draws are learned as absent.

    A partial label leaves an undrawn class open ("any class but the drawn ones"); a class that
    no frame of the training data draws at all (the RV in a dataset that labels only the LV)
    would then be free to appear anywhere. Marking it drawn, with no pixels, teaches the model
    not to predict what this node never showed it.
    """
    if task.kind != TaskKind.segmentation or data.valid is None or len(data) == 0:
        return data
    never = ~data.valid.any(dim=0)
    if not never.any():
        return data
    valid = data.valid.clone()
    valid[:, never] = True
    return TaskData(data.inputs, data.targets, data.subjects, data.spacing_mm, valid)


def foreground_groups(task: Task, data: TaskData) -> list[torch.Tensor]:
    """Per foreground class of a segmentation task, the samples whose label map holds it
    (what foreground oversampling draws from); none for other tasks."""
    if task.kind != TaskKind.segmentation:
        return []
    present = torch.stack([(data.targets == c).flatten(1).any(1)
                           for c in range(1, task.num_outputs)], dim=1)
    return [torch.nonzero(present[:, c]).flatten() for c in range(present.shape[1])]


def frozen_feature_bank(model: torch.nn.Module, task: Task, data: TaskData, settings: TasksConfig,
                        mode: FinetuneMode, plain_sgd: bool, gen: torch.Generator,
                        device: torch.device, layout: torch.memory_format) -> FeatureBank | None:
    """The store of the encoder's features per augmented view, where a session can train on
    them: the whole encoder frozen (``linear``), no DP-SGD (Opacus draws its own batches and
    wraps the model), ``tasks.feature_views`` > 0 and room for enough views."""
    if not (mode == FinetuneMode.linear and plain_sgd and has_encoder(model)
            and settings.feature_views > 0):
        return None
    model.encoder.eval()  # a fixed function: frozen, no drop-path
    bank = FeatureBank(model, task, data, settings.feature_views,
                       int(torch.randint(2**62, (1,), generator=gen)),
                       augment_batch if settings.augment else None, device, layout)
    return bank if bank.active else None


@dataclass
class FinetuneResult:
    local: LocalResult
    epsilon: float = 0.0
    dp_history: list[list[float]] | None = None
    mode: FinetuneMode = FinetuneMode.full  # what trained (tasks.mode=auto resolved)


def finetune(model: torch.nn.Module, task: Task, data: TaskData, settings: TasksConfig, *,
             gen: torch.Generator, device: torch.device, span: Span = Span(),
             dp: DPSettings | None = None, dp_history: list[list[float]] | None = None,
             checkpoint: CheckpointPolicy | None = None, proximal_mu: float = 0.0) -> FinetuneResult:
    """Train ``model`` (an encoder + head from shared_model.tasks.models) on ``data``."""
    if len(data) == 0:
        raise TaskDataError(f"no labelled samples for task '{task.name}'")
    mode = resolved_mode(settings.mode, model, data)
    if dp is not None and mode == FinetuneMode.frozen_then_unfrozen:
        raise PrivacyError("DP-SGD fine-tuning supports tasks.mode=linear, stem, auto or full "
                           "(unfreezing mid-way would change the per-sample gradient set)")
    # convolutions run faster with channels-last tensors (oneDNN on CPU, tensor cores on GPU);
    # Opacus' per-sample gradients keep the default layout
    layout = torch.channels_last if dp is None else torch.contiguous_format
    model.to(device)
    model.to(memory_format=layout)
    set_encoder_trainable(model, mode == FinetuneMode.full)
    stem = trainable_stem(model) if mode == FinetuneMode.stem else None
    if stem is not None:
        stem.stages.requires_grad_(True)
        stem.detach_tokens = True
    data = absent_where_never_drawn(task, data)
    tensors = [data.inputs, data.targets] + ([data.valid] if data.valid is not None else [])
    bank = frozen_feature_bank(model, task, data, settings, mode, dp is None, gen, device, layout)
    adamw = torch.optim.AdamW(mode_param_groups(model, settings, mode), lr=settings.lr)
    private = None
    optimizer: torch.optim.Optimizer = adamw
    batches: LoaderBatches | TensorBatches
    train_model: torch.nn.Module
    if dp is not None:
        dataset = torch.utils.data.TensorDataset(*tensors)
        private = make_private(model, optimizer, dataset, settings.batch_size, dp, gen, dp_history)
        train_model, optimizer, batches = private.model, private.optimizer, LoaderBatches(private.loader)
    else:
        index = [torch.arange(len(data))] if bank is not None else []  # what the bank looks up
        train_model, batches = model, TensorBatches(tensors + index, settings.batch_size, gen,
                                                    foreground_groups(task, data),
                                                    settings.foreground_fraction)
    if mode == FinetuneMode.frozen_then_unfrozen:
        # every parameter is in the optimizer from the start; frozen ones get no gradient
        set_encoder_trainable(model, True)
        optimizer = torch.optim.AdamW(mode_param_groups(model, settings, mode), lr=settings.lr)
        set_encoder_trainable(model, False)

    prox = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
    def step_fn(batch: tuple[torch.Tensor, ...], progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch[0], batch[1]
        valid = batch[2] if data.valid is not None else None
        if bank is not None:
            inputs, targets, features = bank.draw(batch[-1], bank.slots(len(inputs), gen))
            loss = task_loss(task, bank.model.decode(inputs, features), targets, valid)
            return (loss + prox() if prox else loss), {}
        if settings.augment:
            inputs, targets = augment_batch(task, inputs, targets, gen)
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=layout)
        loss = task_loss(task, train_model(inputs), targets, valid)
        return (loss + prox() if prox else loss), {}

    def before_step(step: int, progress: float) -> None:
        if mode == FinetuneMode.frozen_then_unfrozen:  # the session's share, in steps or time
            set_encoder_trainable(model, progress >= settings.frozen_fraction)

    train_model.train()
    if mode in (FinetuneMode.linear, FinetuneMode.stem) and has_encoder(model):
        model.encoder.eval()  # frozen features, no drop-path
        if stem is not None:  # GroupNorm keeps no statistics; Opacus records training modules only
            stem.stages.train()
    try:
        local = run_steps(train_model, batches, step_fn, optimizer=optimizer, steps=settings.steps,
                          base_lr=settings.lr, device=device, gen=gen, span=span,
                          before_step=before_step, checkpoint=checkpoint,
                          dp_history=private.accountant_state if private else None,
                          max_seconds=settings.max_seconds)
    finally:
        model.to(memory_format=torch.contiguous_format)
        if stem is not None:
            stem.detach_tokens = False
        if private is not None:
            private.close()
    if private is not None:
        return FinetuneResult(local, private.epsilon(), private.accountant_state(), mode)
    return FinetuneResult(local, mode=mode)


@torch.no_grad()
def predict_all(model: torch.nn.Module, task: Task, inputs: torch.Tensor, device: torch.device,
                batch_size: int = 32) -> torch.Tensor:
    """Predictions (probabilities, label maps or coordinates) for every input, on the CPU."""
    model.eval()
    model.to(device)
    out = [predict(task, model(inputs[i:i + batch_size].to(device))).cpu()
           for i in range(0, len(inputs), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _predict_with_loss(model: torch.nn.Module, task: Task, data: TaskData, device: torch.device,
                       batch_size: int) -> tuple[torch.Tensor, float]:
    model.eval()
    model.to(device)
    outputs, total = [], 0.0
    for i in range(0, len(data), batch_size):
        batch = data.subset(range(i, min(i + batch_size, len(data))))
        raw = model(batch.inputs.to(device)).cpu()
        total += float(task_loss(task, raw, batch.targets, batch.valid)) * len(batch)
        outputs.append(predict(task, raw))
    return torch.cat(outputs), total / len(data)


def evaluate(model: torch.nn.Module, task: Task, data: TaskData, device: torch.device,
             batch_size: int = 32) -> dict[str, float]:
    """The task's metrics on ``data`` (NaN where a metric is undefined, e.g. no samples)."""
    if len(data) == 0:
        return {"samples": 0.0}
    predictions, loss = _predict_with_loss(model, task, data, device, batch_size)
    metrics = task_metrics(task, predictions, data.targets, data.valid, data.spacing_mm)
    metrics["samples"] = float(len(data))
    metrics["loss"] = loss
    return {k: (float(v) if not (isinstance(v, float) and math.isnan(v)) else math.nan)
            for k, v in metrics.items()}
