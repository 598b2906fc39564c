"""Frames of one series -> a (slices, phases, H, W) stack, or the quality-control reason why not.

Order comes from geometry only: slices by position along the slice normal (row cosine x column
cosine), phases by TriggerTime within each slice, never by file name or instance number (that
only breaks ties between frames of equal trigger time, e.g. frames without one).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.intake.classify import structural_sequence, structural_view
from client.intake.geometry import grid_indices, slice_normal
from client.intake.reading import Frame, SeriesHints
from client.intake.reasons import SkipSeries
from shared_model.labels import UNKNOWN

ORIENTATION_TOLERANCE = 0.01  # max difference of a direction cosine within one series
SPACING_TOLERANCE_MM = 0.01
MAX_FRAMES_PER_SERIES = 20_000
MAP_SEQUENCES = frozenset({"t1_map", "t2_map"})  # raw values are physical (ms)


@dataclass
class SeriesParts:
    """What the scan collected for one series (frames arrive in any order, from any files)."""

    key: str
    subject: str
    study_uid: str
    series_uid: str
    frames: list[Frame] = field(default_factory=list)
    files: list[int] = field(default_factory=list)  # scan indices of the files that gave frames
    fingerprints: list[str] = field(default_factory=list)  # of those files, as they were read
    hints: list[SeriesHints] = field(default_factory=list)


@dataclass
class BuiltSeries:
    """A series in store layout plus what labels need to find their frames."""

    key: str
    subject: str
    study_uid: str
    series_uid: str
    images: np.ndarray  # (S, T, crop, crop) float16
    grid: list[list[Frame]]  # [slice][phase] -> the frame (pixel data dropped)
    sequence: str
    view: str
    info: dict[str, Any]

    @property
    def matrix(self) -> tuple[int, int]:
        return self.grid[0][0].matrix

    @property
    def spacing(self) -> tuple[float, float]:
        return self.grid[0][0].spacing


def _check_consistency(frames: list[Frame]) -> None:
    first = frames[0]
    iop = np.array([f.orientation for f in frames])
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOLERANCE:
        raise SkipSeries("inconsistent_orientation")
    spacing = np.array([f.spacing for f in frames])
    if (any(f.matrix != first.matrix for f in frames)
            or np.abs(spacing - spacing[0]).max() > SPACING_TOLERANCE_MM):
        raise SkipSeries("inconsistent_spacing")


def _check_slice_gaps(positions: np.ndarray) -> None:
    """Evenly spaced slices: a gap over 1.5x the median means a missing slice."""
    if len(positions) < 3:
        return
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    if gaps.max() > 1.5 * median:
        raise SkipSeries("missing_slices")
    if gaps.min() < 0.5 * median:
        raise SkipSeries("inconsistent_slice_spacing")


def _grid(frames: list[Frame]) -> tuple[list[list[Frame]], np.ndarray]:
    """Frames placed by (slice, phase), and the slice positions along the normal (mm)."""
    normal = slice_normal(frames[0].orientation)
    along = np.array([float(np.dot(f.position, normal)) for f in frames])
    keys = [(f.trigger_ms, f.order) for f in frames]
    slices, phases = grid_indices(along, keys)
    n_slices = int(slices.max()) + 1
    counts = Counter(slices.tolist())
    if len(set(counts.values())) != 1:
        raise SkipSeries("missing_phases")
    grid: list[list[Frame | None]] = [[None] * counts[0] for _ in range(n_slices)]
    for frame, s, t in zip(frames, slices, phases):
        grid[s][t] = frame
    for row in grid:
        for a, b in zip(row, row[1:]):
            assert a is not None and b is not None  # a missing frame was skipped as missing_phases
            if (a.trigger_ms, a.order) == (b.trigger_ms, b.order) or (
                    math.isnan(a.trigger_ms) and math.isnan(b.trigger_ms) and a.order == b.order):
                raise SkipSeries("ambiguous_frames")
    positions = np.array([np.mean(along[slices == s]) for s in range(n_slices)])
    return grid, positions  # type: ignore[return-value]


def _labels(parts: SeriesParts, grid: list[list[Frame]]) -> tuple[str, str]:
    """Header text first (most common label over the files), then structure."""
    def vote(values: list[str]) -> str:
        known = Counter(v for v in values if v != UNKNOWN)
        return known.most_common(1)[0][0] if known else UNKNOWN

    sequence = vote([h.sequence for h in parts.hints])
    view = vote([h.view for h in parts.hints])
    if sequence == UNKNOWN:
        distinct = all(
            all(not math.isnan(f.trigger_ms) for f in row)
            and len({round(f.trigger_ms, 3) for f in row}) == len(row) for row in grid)
        sequence = structural_sequence(len(grid[0]), distinct)
    if view == UNKNOWN:
        view = structural_view(sequence, len(grid))
    return sequence, view


def _info(parts: SeriesParts, grid: list[list[Frame]], positions: np.ndarray) -> dict[str, Any]:
    """Geometry numbers for the manifest: nothing absolute, nothing textual from a header."""
    first = grid[0][0]
    strengths = [h.field_strength_t for h in parts.hints if h.field_strength_t is not None]
    relative = positions - positions[0]
    info: dict[str, Any] = {
        "source": "dicom",
        "pixel_spacing_mm": [round(first.spacing[0], 4), round(first.spacing[1], 4)],
        "matrix": list(first.matrix),
        "slice_positions_mm": [round(float(p), 3) for p in relative],
        "slice_spacing_mm": (round(float(np.median(np.diff(positions))), 3)
                             if len(positions) > 1 else None),
        "trigger_times_ms": [[None if math.isnan(f.trigger_ms) else round(f.trigger_ms, 1) for f in row]
                             for row in grid],
        "vendor": _vendor(parts),
        "field_strength_t": max(set(strengths), key=strengths.count) if strengths else None,
        "enhanced": any(h.enhanced for h in parts.hints),
    }
    return info


def _vendor(parts: SeriesParts) -> str:
    vendors = Counter(h.vendor for h in parts.hints)
    return vendors.most_common(1)[0][0] if vendors else UNKNOWN


def intensity_windows(grid: list[list[Frame]]) -> list[list[list[float]]]:
    """Per frame (lo, hi) of the raw values: ``raw = stored * (hi - lo) + lo``.

    Kept for parametric maps, whose raw values are physical (T1/T2 in ms).
    """
    return [[[round(f.window[0], 3), round(f.window[1], 3)] for f in row] for row in grid]


# Series that cannot form a (slices, phases) stack for these reasons keep their frames, each on
# its own, for pretraining (and the sequence task): their pixels are sound.
KEEP_AS_FRAMES = frozenset({"inconsistent_orientation", "inconsistent_spacing", "missing_slices",
                            "missing_phases", "inconsistent_slice_spacing", "ambiguous_frames"})
PLANE_DECIMALS = 2  # direction cosines rounded to this group a localizer's frames by plane


def build_series(parts: SeriesParts) -> BuiltSeries:
    """Order, check and stack one series; raises :class:`SkipSeries` with the QC reason.

    A series that is not a stack (a three-plane localizer, a stack with a gap) becomes a series
    of single frames instead (:func:`frames_series`), unless it is too large.
    """
    if len(parts.frames) > MAX_FRAMES_PER_SERIES:
        raise SkipSeries("series_too_large")
    try:
        return _stack_series(parts)
    except SkipSeries as skip:
        if skip.reason not in KEEP_AS_FRAMES:
            raise
        return frames_series(parts, skip.reason)


def frames_series(parts: SeriesParts, reason: str) -> BuiltSeries:
    """The frames of a series that is no stack, as (N, 1, crop, crop): split by plane (as
    dcm2niix splits a localizer), each plane's frames along its normal, then by time.

    Frames of several planes make a ``localizer``; ``info["stack"]`` is False and
    ``info["planes"]`` gives each frame's plane, ``info["not_a_stack"]`` the QC reason.
    """
    planes: dict[tuple[float, ...], list[Frame]] = {}
    for frame in parts.frames:
        planes.setdefault(tuple(round(v, PLANE_DECIMALS) for v in frame.orientation), []).append(frame)
    ordered, plane_of = [], []
    for index, (_, members) in enumerate(sorted(planes.items())):
        normal = slice_normal(members[0].orientation)
        members.sort(key=lambda f: (round(float(np.dot(f.position, normal)), 2),
                                    0.0 if math.isnan(f.trigger_ms) else f.trigger_ms, f.order))
        ordered += members
        plane_of += [index] * len(members)
    grid = [[f] for f in ordered]
    images = np.stack([f.image for f in ordered]).astype(np.float16, copy=False)[:, None]
    sequence, view = _labels(parts, grid) if len(planes) == 1 else ("localizer", UNKNOWN)
    first = ordered[0]
    info: dict[str, Any] = {
        "source": "dicom", "stack": False, "not_a_stack": reason, "planes": plane_of,
        "pixel_spacing_mm": [round(first.spacing[0], 4), round(first.spacing[1], 4)],
        "matrix": list(first.matrix), "vendor": _vendor(parts),
    }
    for f in ordered:
        f.image = np.empty(0, dtype=np.float16)
    return BuiltSeries(key=parts.key, subject=parts.subject, study_uid=parts.study_uid,
                       series_uid=parts.series_uid, images=images, grid=grid,
                       sequence=sequence, view=view, info=info)


def _stack_series(parts: SeriesParts) -> BuiltSeries:
    frames = parts.frames
    _check_consistency(frames)
    grid, positions = _grid(frames)
    _check_slice_gaps(positions)
    images = np.stack([f.image for row in grid for f in row]).astype(np.float16, copy=False)
    images = images.reshape(len(grid), len(grid[0]), *images.shape[1:])
    sequence, view = _labels(parts, grid)
    info = _info(parts, grid, positions)
    for row in grid:  # the stack holds the pixels now; labels need only the geometry
        for f in row:
            f.image = np.empty(0, dtype=np.float16)
    return BuiltSeries(key=parts.key, subject=parts.subject, study_uid=parts.study_uid,
                       series_uid=parts.series_uid, images=images, grid=grid,
                       sequence=sequence, view=view, info=info)
