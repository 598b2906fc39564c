"""Segmentation of whole frames in their own geometry: find the heart, crop, segment, map back.

A clinical export is not centred on the heart and often has a large field of view, and its
pixels are not the model's. For every stack (the frames of one series, or one nnU-Net case) the
node

1. looks at a few frames through the window the store cuts (centred on the image, the window
   the model was trained on); when the heart is not there, resamples each of those frames'
   whole field of view to the model's pixel spacing and runs the model over it (the encoder
   takes any size): the foreground region that is largest and nearest the image centre gives
   the heart's centre, one centre per stack (see :func:`locate_heart`);
2. cuts the model's window (``image_size`` px at the model spacing, the field of view it was
   trained on) around that centre from each frame, normalises it as the store does, and
   segments it (probabilities averaged over flips);
3. samples the class probabilities back at the centres of the frame's own pixels and takes the
   most likely class, so the mask has the input's matrix exactly; each class keeps its largest
   region, and a cavity class (the task's ``convex`` classes: the LV blood pool) that is nearly
   convex becomes the convex region around it, as its expert contour runs around the papillary
   muscles.

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
MIN_HEART_MM2 = 100.0  # smallest foreground region taken for a heart (an LV cavity in systole)
# The store's window moves onto a heart it shows only when that heart lies further than this
# share of the window from its centre.
RECENTRE_FRACTION = 0.25
# A convex class's region is drawn as its hull only when it fills at least this share of it
# (on the fixed test set the same Dice as any hull, without hulls spanning both ventricles).
MIN_SOLIDITY = 0.85


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
    convex_classes: tuple[int, ...] = ()  # classes drawn as their region's convex hull

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


def heart_candidate(foreground: np.ndarray, prior_sigma_px: float
                    ) -> tuple[float, float] | None:
    """The (row, col) centre of the foreground region of a whole view most likely the heart.

    Each connected region (probability > 0.5) scores its summed foreground probability times a
    Gaussian prior around the view's centre (``prior_sigma_px``); None when there is none.
    """
    from scipy import ndimage

    labels, count = ndimage.label(foreground > 0.5)
    middle = (foreground.shape[0] - 1) / 2, (foreground.shape[1] - 1) / 2
    best: tuple[float, float, float] | None = None
    for region in range(1, count + 1):
        inside = labels == region
        if inside.sum() < 4:
            continue
        r, c = np.argwhere(inside).mean(axis=0)
        distance2 = (r - middle[0]) ** 2 + (c - middle[1]) ** 2
        weight = float(foreground[inside].sum()) * math.exp(-distance2 / (2 * prior_sigma_px ** 2))
        if best is None or weight > best[0]:
            best = (weight, float(r), float(c))
    return None if best is None else (best[1], best[2])


def heart_in_window(foreground: np.ndarray, min_px: float) -> tuple[float, float] | None:
    """The (row, col) centre of the heart a window's foreground probabilities show, or None.

    The heart: a connected region of at least ``min_px`` pixels holding at least half of the
    window's foreground (a model shown no heart calls scattered patches foreground, if
    anything).
    """
    found = foreground > 0.5
    largest = largest_component(found)
    size = int(largest.sum())
    if size < min_px or size < 0.5 * int(found.sum()):
        return None
    r, c = np.argwhere(largest).mean(axis=0)
    return float(r), float(c)


def locate_heart(segmenter: Segmenter, frames: Sequence[np.ndarray],
                 spacing: tuple[float, float]) -> tuple[float, float]:
    """The window's centre as (row, col) in the frames' own pixels (one stack, one geometry).

    The model learnt on windows cut around the image centre (the store's grid), and cardiac
    scans are planned with the heart near the isocentre; outside such windows a model sees
    anatomy it was never trained on and often calls other bright structures blood pool. So
    the window the store would cut comes first: when it shows the heart in at least half of
    the frames looked at, it stays the window unless that heart lies further than a quarter
    window from its centre (then the window moves onto it). Otherwise the heart is searched for in the whole
    field of view, each foreground region weighed by a prior around the image centre (sigma
    a quarter of the model's window), the median over the frames. Falls back to the image
    centre when no frame shows a foreground region.
    """
    rows, cols = frames[0].shape
    middle = (rows - 1) / 2, (cols - 1) / 2
    grid = segmenter.grid
    picks = np.unique(np.linspace(0, len(frames) - 1, min(LOCALISE_FRAMES, len(frames))).round())
    chosen = [np.asarray(frames[i], dtype=np.float32) for i in picks.astype(int)]
    windows = np.stack([normalise_intensity(resample_image(f, spacing, grid.size, grid.spacing_mm))
                        for f in chosen])
    centred = segmenter.probabilities(torch.from_numpy(windows)[:, None])
    min_px = MIN_HEART_MM2 / grid.spacing_mm ** 2
    seen = [heart_in_window((1.0 - p[0]).numpy(), min_px) for p in centred]
    hearts = [(r - (grid.size - 1) / 2, c - (grid.size - 1) / 2) for r, c in filter(None, seen)]
    if 2 * len(hearts) >= len(chosen):  # offsets from the window's centre, model pixels
        dr, dc = float(np.median([h[0] for h in hearts])), float(np.median([h[1] for h in hearts]))
        if math.hypot(dr, dc) <= RECENTRE_FRACTION * grid.size:
            return middle
        return (middle[0] + dr * grid.spacing_mm / spacing[0],
                middle[1] + dc * grid.spacing_mm / spacing[1])
    centres = []
    for frame in chosen:
        view, side = whole_view(frame, spacing, grid)
        probs = segmenter.probabilities(torch.from_numpy(view)[None, None])[0]
        found = heart_candidate((1.0 - probs[0]).numpy(), grid.size / 4)
        if found is None:
            continue
        # whole-view pixel -> original pixel (the view is centred on the image centre)
        centres.append(((found[0] - (side - 1) / 2) * grid.spacing_mm / spacing[0] + middle[0],
                        (found[1] - (side - 1) / 2) * grid.spacing_mm / spacing[1] + middle[1]))
    if not centres:
        return middle
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
            out[start + i] = clean_labels(labels, segmenter.convex_classes) if keep_largest else labels
    return out


def clean_labels(labels: np.ndarray, convex_classes: Sequence[int] = ()) -> np.ndarray:
    """One frame's class map as predictions are delivered: each class its largest region, a
    ``convex_classes`` class the convex region around it when that region is nearly convex
    already (at least :data:`MIN_SOLIDITY` of its hull): notches such as papillary muscles
    are filled, while a region far from convex (two cavities run together, a tail along a
    wall) is not one cavity, and its hull would claim what lies between."""
    labels = keep_largest_per_class(labels)
    for value in convex_classes:
        region = labels == value
        hull = convex_hull(region)
        if region.sum() >= MIN_SOLIDITY * hull.sum():
            labels[hull] = value
    return labels


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels whose centres lie in the convex hull of ``mask``'s pixel centres (the mask
    itself when it has fewer than three pixels or they lie on a line)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask)
    if len(points) < 3:
        return mask
    try:
        facets = ConvexHull(points).equations  # (F, 3): normal . p + offset <= 0 inside
    except QhullError:
        return mask
    (r0, c0), (r1, c1) = points.min(axis=0), points.max(axis=0) + 1
    rows, cols = np.mgrid[r0:r1, c0:c1]
    box = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    inside = np.all(box @ facets[:, :2].T + facets[:, 2] <= 1e-9, axis=1).reshape(rows.shape)
    out = mask.copy()
    out[r0:r1, c0:c1] |= inside
    return out


def keep_largest_per_class(labels: np.ndarray) -> np.ndarray:
    """Each class keeps its largest connected region; stray islands become background."""
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        out[largest_component(labels == value)] = value
    return out
