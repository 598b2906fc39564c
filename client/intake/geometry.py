"""Where a pixel is: slice normals, stack order, and the map from scanner pixels to store pixels.

The store keeps every frame on one grid: ``crop_px`` x ``crop_px`` pixels of ``spacing_mm``,
centred on the centre of the original image. A point at original pixel (row, col) (0-based,
pixel centres at integers) lies at store pixel::

    row' = (row - (rows - 1) / 2) * row_spacing / spacing_mm + (crop_px - 1) / 2

and likewise for columns. Images are resampled through that map with linear interpolation
(anti-aliased when shrinking), masks with nearest neighbour, landmarks exactly.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SLICE_TOLERANCE_MM = 0.1  # positions closer than this along the normal are one slice


def slice_normal(orientation: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """n = row cosine x column cosine (ImageOrientationPatient), the stack's increasing direction."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def to_store(coord: float | np.ndarray, n_in: int, spacing_in: float, n_out: int,
             spacing_out: float) -> float | np.ndarray:
    """One axis of the original -> store pixel map (see the module docstring)."""
    return (coord - (n_in - 1) / 2.0) * (spacing_in / spacing_out) + (n_out - 1) / 2.0


def from_store(coord: float | np.ndarray, n_in: int, spacing_in: float, n_out: int,
               spacing_out: float) -> float | np.ndarray:
    """The inverse of :func:`to_store`: store pixel -> original pixel along one axis."""
    return (coord - (n_out - 1) / 2.0) * (spacing_out / spacing_in) + (n_in - 1) / 2.0


@lru_cache(maxsize=64)
def axis_taps(n_in: int, spacing_in: float, n_out: int,
              spacing_out: float, centre_in: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sparse linear-interpolation weights for one axis: (indices, weights), each (n_out, taps).

    A tent of half-width max(1, spacing_out / spacing_in) original pixels (anti-aliasing when
    shrinking), normalised to sum 1. Store pixels outside the original image get zero weights
    (zero padding). The output is centred on original pixel ``centre_in`` (default: the image
    centre, the store's grid).
    """
    centres = np.asarray(from_store(np.arange(n_out, dtype=np.float64), n_in, spacing_in, n_out, spacing_out))
    if centre_in is not None:
        centres = centres + (centre_in - (n_in - 1) / 2.0)
    width = max(1.0, spacing_out / spacing_in)
    taps = int(np.ceil(2 * width)) + 1
    first = np.floor(centres - width).astype(np.int64) + 1
    index = first[:, None] + np.arange(taps)[None, :]
    weights = np.clip(1.0 - np.abs(index - centres[:, None]) / width, 0.0, None)
    weights[(index < 0) | (index >= n_in)] = 0.0
    inside = (centres >= -0.5) & (centres <= n_in - 0.5)
    sums = weights.sum(axis=1, keepdims=True)
    weights = np.where(inside[:, None] & (sums > 0), weights / np.maximum(sums, 1e-12), 0.0)
    index = np.clip(index, 0, n_in - 1)
    index.setflags(write=False)
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return index, weights


def resample_image(image: np.ndarray, spacing: tuple[float, float], crop_px: int,
                   spacing_mm: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """A (rows, cols) frame at ``spacing`` (row, col) mm -> (crop_px, crop_px) float32 at spacing_mm.

    ``centre`` (row, col original pixels) moves the crop off the image centre (prediction crops
    around the heart). Separable and sparse (a few taps per output pixel): ~0.12 ms for 256 ->
    128 px, where a dense matrix product costs twenty times that on a busy 2-core node. Only the
    columns the crop reaches go through the row pass, and the column pass gathers contiguous
    rows of the transposed intermediate.
    """
    rows, cols = image.shape
    r_centre, c_centre = (None, None) if centre is None else (float(centre[0]), float(centre[1]))
    r_index, r_weights = axis_taps(rows, float(spacing[0]), crop_px, spacing_mm, r_centre)
    c_index, c_weights = axis_taps(cols, float(spacing[1]), crop_px, spacing_mm, c_centre)
    first, last = int(c_index[0, 0]), int(c_index[-1, -1]) + 1  # indices ascend along both axes
    image = image.astype(np.float32, copy=False)
    by_rows = np.einsum("ot,otc->oc", r_weights, image[r_index, first:last])  # (crop, used cols)
    by_cols = np.ascontiguousarray(by_rows.T)[c_index - first]  # (crop, taps, crop)
    return np.einsum("ot,otr->ro", c_weights, by_cols)  # (crop, crop)


@lru_cache(maxsize=64)
def nearest_indices(n_in: int, spacing_in: float, n_out: int, spacing_out: float) -> np.ndarray:
    """For each store pixel, the nearest original pixel index, or -1 outside the image."""
    centres = np.asarray(from_store(np.arange(n_out, dtype=np.float64), n_in, spacing_in, n_out, spacing_out))
    index = np.floor(centres + 0.5).astype(np.int64)
    index[(index < 0) | (index >= n_in)] = -1
    index.setflags(write=False)
    return index


def resample_mask(mask: np.ndarray, spacing: tuple[float, float], crop_px: int,
                  spacing_mm: float) -> np.ndarray:
    """A (rows, cols) label map -> (crop_px, crop_px) uint8 by nearest neighbour, 0 outside."""
    rows, cols = mask.shape
    r = nearest_indices(rows, float(spacing[0]), crop_px, spacing_mm)
    c = nearest_indices(cols, float(spacing[1]), crop_px, spacing_mm)
    out = mask[np.clip(r, 0, None)[:, None], np.clip(c, 0, None)[None, :]].astype(np.uint8)
    out[(r < 0)[:, None] | (c < 0)[None, :]] = 0
    return out


def point_to_store(row: float, col: float, matrix: tuple[int, int], spacing: tuple[float, float],
                   crop_px: int, spacing_mm: float) -> tuple[float, float]:
    """A landmark at original pixel (row, col) -> store pixel (row, col)."""
    return (float(to_store(row, matrix[0], spacing[0], crop_px, spacing_mm)),
            float(to_store(col, matrix[1], spacing[1], crop_px, spacing_mm)))


def cluster_positions(positions: np.ndarray, tolerance: float = SLICE_TOLERANCE_MM) -> np.ndarray:
    """Slice index (0 = lowest position along the normal) of each frame's position, in mm."""
    order = np.argsort(positions, kind="stable")
    index = np.empty(len(positions), dtype=np.int64)
    current, last = 0, None
    for i in order:
        if last is not None and positions[i] - last > tolerance:
            current += 1
        index[i] = current
        last = positions[i]
    return index


def phase_ranks(slice_index: np.ndarray, temporal_keys: list[tuple[float, float]]) -> np.ndarray:
    """Phase index of each frame within its slice: rank by (TriggerTime ms, tie-break order).

    A missing TriggerTime (NaN) sorts by the tie-break alone (0 in its place).
    """
    ranks = np.empty(len(slice_index), dtype=np.int64)
    for s in np.unique(slice_index):
        members = np.flatnonzero(slice_index == s)
        keys = [(0.0 if np.isnan(temporal_keys[i][0]) else temporal_keys[i][0], temporal_keys[i][1], i)
                for i in members]
        for rank, (_, _, i) in enumerate(sorted(keys)):
            ranks[i] = rank
    return ranks


def grid_indices(positions_mm: np.ndarray,
                 temporal_keys: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(slice, phase) of each frame: slices by position along the normal, phases by time.

    The one ordering rule of the intake; adapters that place labels (Sunnybrook contours) call
    it too, so labels and images agree frame by frame.
    """
    slices = cluster_positions(np.asarray(positions_mm, dtype=np.float64))
    return slices, phase_ranks(slices, temporal_keys)
