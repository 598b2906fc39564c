"""Segmentation of whole frames in their own geometry: find the heart, crop, segment, map back.

A clinical export is not centred on the heart and often has a large field of view, and its
pixels are not the model's. For every stack (the frames of one series, or one nnU-Net case) the
node

1. resamples each frame's whole field of view to the model's pixel spacing and runs the model
   over it (the encoder takes any size): the largest connected foreground region of a few
   frames gives the heart's centre, one centre per stack (the median over those frames);
2. cuts the model's window (``image_size`` px at the model spacing, the field of view it was
   trained on) around that centre from each frame, normalises it as the store does, and
   segments it (probabilities averaged over flips);
3. samples the class probabilities back at the centres of the frame's own pixels and takes the
   most likely class, so the mask has the input's matrix exactly.

Functions here see pixel arrays and spacings only; the readers of DICOM and nnU-Net inputs
live in :mod:`client.predict_inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from client.intake.geometry import resample_image
from client.store import normalise_intensity

LOCALISE_FRAMES = 6  # frames of a stack the coarse pass looks at
PAD_MULTIPLE = 16  # the whole-view pass pads to a multiple of the encoder's coarsest stride


@dataclass(frozen=True)
class ModelGrid:
    """The model's input: ``size`` x ``size`` pixels of ``spacing_mm``."""

    size: int
    spacing_mm: float

    @property
    def field_of_view_mm(self) -> float:
        return self.size * self.spacing_mm


@dataclass
class Segmenter:
    """A trained segmentation model and the grid it was trained on."""

    model: torch.nn.Module
    grid: ModelGrid
    device: torch.device
    flips: bool = True  # average the probabilities over horizontal/vertical flips

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, K, H, W) softmax, averaged over flips."""
        self.model.eval()
        x = images.to(self.device)
        probs = torch.softmax(self.model(x).float(), dim=1)
        if self.flips:
            for dims in ((-1,), (-2,), (-1, -2)):
                probs += torch.softmax(self.model(x.flip(dims)).float(), dim=1).flip(dims)
            probs /= 4
        return probs.cpu()


def whole_view(frame: np.ndarray, spacing: tuple[float, float], grid: ModelGrid
               ) -> tuple[np.ndarray, int]:
    """The whole frame at the model spacing, square and padded: (image, side in px)."""
    extent = max(frame.shape[0] * spacing[0], frame.shape[1] * spacing[1])
    side = max(grid.size, int(math.ceil(extent / grid.spacing_mm / PAD_MULTIPLE)) * PAD_MULTIPLE)
    return normalise_intensity(resample_image(frame, spacing, side, grid.spacing_mm)), side


def largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def locate_heart(segmenter: Segmenter, frames: Sequence[np.ndarray],
                 spacing: tuple[float, float]) -> tuple[float, float]:
    """The heart's centre as (row, col) in the frames' own pixels (one stack, one geometry).

    Falls back to the image centre when no frame shows a foreground region.
    """
    rows, cols = frames[0].shape
    picks = np.unique(np.linspace(0, len(frames) - 1, min(LOCALISE_FRAMES, len(frames))).round())
    centres = []
    for index in picks.astype(int):
        view, side = whole_view(frames[index], spacing, segmenter.grid)
        probs = segmenter.probabilities(torch.from_numpy(view)[None, None])[0]
        found = largest_component((1.0 - probs[0]).numpy() > 0.5)
        if found.sum() < 4:
            continue
        r, c = np.argwhere(found).mean(axis=0)
        # whole-view pixel -> original pixel (the view is centred on the image centre)
        centres.append(((r - (side - 1) / 2) * segmenter.grid.spacing_mm / spacing[0] + (rows - 1) / 2,
                        (c - (side - 1) / 2) * segmenter.grid.spacing_mm / spacing[1] + (cols - 1) / 2))
    if not centres:
        return (rows - 1) / 2, (cols - 1) / 2
    return float(np.median([p[0] for p in centres])), float(np.median([p[1] for p in centres]))


def probabilities_to_frame(probs: torch.Tensor, centre: tuple[float, float],
                           shape: tuple[int, int], spacing: tuple[float, float],
                           grid: ModelGrid) -> torch.Tensor:
    """(K, size, size) window probabilities -> (K, rows, cols) at the frame's pixel centres;
    outside the window everything is background."""
    rows, cols = shape
    # frame pixel -> window pixel, then to grid_sample's [-1, 1] (align_corners=False)
    r = (np.arange(rows) - centre[0]) * spacing[0] / grid.spacing_mm + (grid.size - 1) / 2
    c = (np.arange(cols) - centre[1]) * spacing[1] / grid.spacing_mm + (grid.size - 1) / 2
    y = torch.from_numpy((2 * r + 1) / grid.size - 1).float()
    x = torch.from_numpy((2 * c + 1) / grid.size - 1).float()
    sample = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)[None]  # (1, rows, cols, 2)
    background = torch.zeros_like(probs[:, :1, :1])
    background[0] = 1.0
    padded = probs - background  # zero padding outside then means "background"
    out = F.grid_sample(padded[None], sample, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    return out + background


def segment_stack(segmenter: Segmenter, frames: Sequence[np.ndarray],
                  spacing: tuple[float, float], keep_largest: bool = True,
                  batch_size: int = 16, stack: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Class indices (N, rows, cols) for N frames of one geometry (row, col spacing in mm).

    ``stack``: the whole stack the frames belong to, where the heart is looked for (default:
    the frames themselves).
    """
    centre = locate_heart(segmenter, stack if stack is not None else frames, spacing)
    grid = segmenter.grid
    out = np.zeros((len(frames), *frames[0].shape), dtype=np.uint8)
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        windows = np.stack([normalise_intensity(resample_image(
            np.asarray(f, dtype=np.float32), spacing, grid.size, grid.spacing_mm, centre))
            for f in chunk])
        probs = segmenter.probabilities(torch.from_numpy(windows)[:, None])
        for i, window_probs in enumerate(probs):
            labels = probabilities_to_frame(window_probs, centre, frames[0].shape, spacing,
                                            grid).argmax(dim=0).numpy().astype(np.uint8)
            out[start + i] = keep_largest_per_class(labels) if keep_largest else labels
    return out


def keep_largest_per_class(labels: np.ndarray) -> np.ndarray:
    """Each class keeps its largest connected region; stray islands become background."""
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        out[largest_component(labels == value)] = value
    return out
