"""Losses, predictions and metrics per task kind.

Segmentation: Dice + cross-entropy that also takes partial labels (MONAI's DiceCE where every
frame draws every class); Dice and HD95 (mm) per structure from MONAI. Classification:
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
        return partial_dice_ce(outputs, targets, valid)
    return heatmap_loss(outputs, targets, valid)


DICE_SMOOTH = 1.0e-5  # MONAI DiceLoss' smooth_nr / smooth_dr


def partial_dice_ce(logits: torch.Tensor, targets: torch.Tensor,
                    drawn: torch.Tensor | None = None) -> torch.Tensor:
    """Dice + cross-entropy for label maps that may draw only some of the classes.

    ``logits`` (B, K, H, W) with class 0 the background; ``targets`` (B, H, W) class indices,
    0 for background or a class not drawn on that frame; ``drawn`` (B, K - 1) bool, None when
    every frame draws every class. Cross-entropy: a pixel of a drawn class c costs -log p_c; a
    pixel left 0 costs -log of the summed probability of background and the classes not drawn
    there (it is one of them: the marginal likelihood of the partial label). Dice: soft Dice of
    each drawn foreground class on each frame, averaged over those (frame, class) pairs. With
    every class drawn this is MONAI's ``DiceCELoss(include_background=False, to_onehot_y=True,
    softmax=True)``.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    b, k = logp.shape[:2]
    if drawn is None:
        drawn = torch.ones(b, k - 1, dtype=torch.bool, device=logits.device)
    drawn = drawn.to(logits.device)
    may_be = torch.cat([torch.ones_like(drawn[:, :1]), ~drawn], dim=1)  # what a 0 pixel may be
    marginal = torch.logsumexp(logp.masked_fill(~may_be[:, :, None, None], -math.inf), dim=1)
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    ce = -torch.where(targets > 0, picked, marginal).mean()
    probs = logp.exp()[:, 1:]
    onehot = F.one_hot(targets, k).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = 1 - (2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)
    weight = drawn.float()
    return ce + (dice * weight).sum() / weight.sum().clamp(min=1)


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
                         spacing_mm: float, drawn: torch.Tensor | None = None) -> dict[str, float]:
    """Dice and HD95 (mm) per structure, averaged over the frames where it is present and
    drawn (``drawn`` (N, C): which classes each frame's label draws; None: all)."""
    metrics: dict[str, float] = {}
    dices = []
    for name, class_ids in task.structure_classes:
        ids = torch.tensor(class_ids)
        frames = torch.ones(len(pred), dtype=torch.bool) if drawn is None else \
            drawn[:, [i - 1 for i in class_ids]].all(dim=1).cpu()
        if not frames.any():  # no test frame draws this structure: undefined, not zero
            metrics[f"dice_{name}"] = metrics[f"hd95_mm_{name}"] = math.nan
            dices.append(math.nan)
            continue
        p = torch.isin(pred[frames], ids).float()[:, None]
        t = torch.isin(target[frames], ids).float()[:, None]
        dice = compute_dice(p, t, include_background=True, ignore_empty=True)[:, 0]
        both = (p.flatten(1).sum(1) > 0) & (t.flatten(1).sum(1) > 0)
        with warnings.catch_warnings():  # MONAI 1.6 deprecation notice inside its own code
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(p[both], t[both], include_background=True, percentile=95,
                                            spacing=spacing_mm)[:, 0] if both.any() else torch.empty(0)
        metrics[f"dice_{name}"] = float(torch.nanmean(dice)) if len(dice) else math.nan
        metrics[f"hd95_mm_{name}"] = float(torch.nanmean(hd)) if len(hd) else math.nan
        dices.append(metrics[f"dice_{name}"])
    defined = [d for d in dices if not math.isnan(d)]
    metrics["dice_mean"] = float(np.mean(defined)) if defined else math.nan
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
        return segmentation_metrics(task, predictions, targets, spacing_mm, valid)
    assert valid is not None
    return landmark_metrics(predictions, targets, valid, spacing_mm, task.landmarks)  # type: ignore[attr-defined]


def headline_metric(task: Task) -> str:
    """The one number a report leads with for this task."""
    if _is_classification(task):
        return "balanced_accuracy"
    if task.kind == TaskKind.segmentation:
        return "dice_mean"
    return "landmark_error_mm"
