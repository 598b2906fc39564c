"""Losses, predictions and metrics per task kind.

Segmentation: MONAI DiceCE loss; Dice and HD95 (mm) per structure from MONAI. Classification:
cross-entropy; accuracy, balanced accuracy and macro AUC (MONAI). Landmarks: heatmaps trained
with a cross-entropy against a Gaussian around each point, decoded with a local soft-argmax
(sub-pixel), reported as mean error in mm.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc

from shared_model.tasks.base import SegmentationTask, Task, TaskKind

HEATMAP_SIGMA_PX = 1.5  # Gaussian target width, input pixels
DECODE_RADIUS_PX = 4  # half-size of the soft-argmax window around the peak (~2.7 sigma)


def _is_classification(task: Task) -> bool:
    return task.kind in (TaskKind.frame_classification, TaskKind.bag_classification)


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the batch (a mean of per-sample terms, as DP-SGD needs)."""
    if _is_classification(task):
        return F.cross_entropy(outputs.float(), targets)
    if task.kind == TaskKind.segmentation:
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        return loss(outputs.float(), targets[:, None])
    return heatmap_loss(outputs, targets, valid)


# ---------------------------------------------------------------------------- landmarks


def gaussian_heatmaps(coords: torch.Tensor, height: int, width: int,
                      sigma: float = HEATMAP_SIGMA_PX) -> torch.Tensor:
    """(B, L, 2) (row, col) -> (B, L, H*W) distributions (each sums to 1)."""
    rows = torch.arange(height, dtype=torch.float32, device=coords.device)
    cols = torch.arange(width, dtype=torch.float32, device=coords.device)
    dr = (rows[None, None, :, None] - coords[..., 0, None, None]) ** 2
    dc = (cols[None, None, None, :] - coords[..., 1, None, None]) ** 2
    logits = -(dr + dc) / (2 * sigma**2)
    return torch.softmax(logits.flatten(2), dim=-1)


def heatmap_loss(logits: torch.Tensor, coords: torch.Tensor,
                 valid: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of each landmark's spatial softmax against its Gaussian target."""
    b, n, h, w = logits.shape
    target = gaussian_heatmaps(coords, h, w)
    per_point = -(target * F.log_softmax(logits.float().flatten(2), dim=-1)).sum(dim=-1)
    weight = torch.ones(b, n, device=logits.device) if valid is None else valid.float()
    per_sample = (per_point * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
    return per_sample.mean()


def decode_heatmaps(logits: torch.Tensor, radius: int = DECODE_RADIUS_PX) -> torch.Tensor:
    """(B, L, H, W) -> (B, L, 2) sub-pixel (row, col): weighted centroid around the peak."""
    b, n, h, w = logits.shape
    probs = torch.softmax(logits.float().flatten(2), dim=-1).view(b, n, h, w)
    peak = probs.flatten(2).argmax(dim=-1)
    pr, pc = peak // w, peak % w
    offsets = torch.arange(-radius, radius + 1, device=logits.device)
    size = 2 * radius + 1
    rr = (pr[..., None, None] + offsets[:, None]).expand(b, n, size, size)
    cc = (pc[..., None, None] + offsets[None, :]).expand(b, n, size, size)
    inside = ((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)).float()
    flat_index = (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).flatten(2)
    window = probs.flatten(2).gather(-1, flat_index).view(b, n, size, size) * inside
    total = window.sum(dim=(-1, -2)).clamp(min=1e-12)
    row = (window * rr).sum(dim=(-1, -2)) / total
    col = (window * cc).sum(dim=(-1, -2)) / total
    return torch.stack([row, col], dim=-1)


# ---------------------------------------------------------------------------- predictions


def predict(task: Task, outputs: torch.Tensor) -> torch.Tensor:
    """Class probabilities, label maps, or landmark coordinates from raw model outputs."""
    if _is_classification(task):
        return torch.softmax(outputs.float(), dim=-1)
    if task.kind == TaskKind.segmentation:
        return outputs.argmax(dim=1)
    return decode_heatmaps(outputs)


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor,
                           num_classes: int) -> dict[str, float]:
    pred = probs.argmax(dim=-1)
    accuracy = float((pred == targets).float().mean()) if len(targets) else math.nan
    present = sorted(set(targets.tolist()))
    recalls = [float((pred[targets == c] == c).float().mean()) for c in present]
    metrics = {"accuracy": accuracy,
               "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan}
    if len(present) >= 2:
        onehot = F.one_hot(targets, num_classes)[:, present].float()
        metrics["auc"] = float(cast(float, compute_roc_auc(probs[:, present], onehot, average="macro")))
    else:
        metrics["auc"] = math.nan
    return metrics


def segmentation_metrics(task: SegmentationTask, pred: torch.Tensor, target: torch.Tensor,
                         spacing_mm: float) -> dict[str, float]:
    """Dice and HD95 (mm) per structure, averaged over the frames where it is present."""
    metrics: dict[str, float] = {}
    dices = []
    for name, class_ids in task.structure_classes:
        ids = torch.tensor(class_ids)
        p = torch.isin(pred, ids).float()[:, None]
        t = torch.isin(target, ids).float()[:, None]
        dice = compute_dice(p, t, include_background=True, ignore_empty=True)[:, 0]
        both = (p.flatten(1).sum(1) > 0) & (t.flatten(1).sum(1) > 0)
        with warnings.catch_warnings():  # MONAI 1.6 deprecation notice inside its own code
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(p[both], t[both], include_background=True, percentile=95,
                                            spacing=spacing_mm)[:, 0] if both.any() else torch.empty(0)
        metrics[f"dice_{name}"] = float(torch.nanmean(dice)) if len(dice) else math.nan
        metrics[f"hd95_mm_{name}"] = float(torch.nanmean(hd)) if len(hd) else math.nan
        dices.append(metrics[f"dice_{name}"])
    metrics["dice_mean"] = float(np.nanmean(dices)) if dices else math.nan
    return metrics


def landmark_metrics(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                     spacing_mm: float, names: tuple[str, ...]) -> dict[str, float]:
    error_mm = (pred - target).norm(dim=-1) * spacing_mm
    metrics = {"landmark_error_mm": float(error_mm[valid].mean()) if valid.any() else math.nan}
    for i, name in enumerate(names):
        if valid[:, i].any():
            metrics[f"error_mm_{name}"] = float(error_mm[:, i][valid[:, i]].mean())
    return metrics


def task_metrics(task: Task, predictions: torch.Tensor, targets: torch.Tensor,
                 valid: torch.Tensor | None, spacing_mm: float) -> dict[str, float]:
    if _is_classification(task):
        return classification_metrics(predictions, targets, task.num_outputs)
    if task.kind == TaskKind.segmentation:
        assert isinstance(task, SegmentationTask)
        return segmentation_metrics(task, predictions, targets, spacing_mm)
    assert valid is not None
    return landmark_metrics(predictions, targets, valid, spacing_mm, task.landmarks)  # type: ignore[attr-defined]


def headline_metric(task: Task) -> str:
    """The one number a report leads with for this task."""
    if _is_classification(task):
        return "balanced_accuracy"
    if task.kind == TaskKind.segmentation:
        return "dice_mean"
    return "landmark_error_mm"
