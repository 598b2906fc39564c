"""Imaging planes in patient coordinates (LPS, mm) and how a CMR operator plans them.

A ``Plane`` is exactly what DICOM says about a frame: ImagePositionPatient (centre of the first
pixel), ImageOrientationPatient (row direction = increasing column index, column direction =
increasing row index), PixelSpacing (between rows, between columns), Rows, Columns. Its normal is
row x column. Short-axis stacks are perpendicular to the LV long axis, base to apex; long-axis
planes contain the long axis at their conventional rotation (4CH through the RV, 2CH through the
anterior and inferior walls, 3CH through the aortic outflow). Displays follow the clinical habit:
SAX seen from the apex with the RV on the left and anterior up; LAX with the apex up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.phantom import Anatomy, HeartFrame, heart_frame, heart_state

LAX_VIEWS = ("2ch", "3ch", "4ch")


@dataclass(frozen=True, eq=False)
class Plane:
    position: np.ndarray  # LPS mm of the centre of pixel (row 0, col 0)
    row_dir: np.ndarray  # unit, along a row (increasing column index)
    col_dir: np.ndarray  # unit, along a column (increasing row index)
    rows: int
    cols: int
    spacing: tuple[float, float]  # (between rows, between columns) mm, DICOM PixelSpacing order

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient (six direction cosines)."""
        return [float(v) for v in (*self.row_dir, *self.col_dir)]

    def pixel_to_lps(self, row: float, col: float) -> np.ndarray:
        return (self.position + col * self.spacing[1] * self.row_dir
                + row * self.spacing[0] * self.col_dir)

    def lps_to_pixel(self, point: np.ndarray) -> tuple[float, float]:
        """(row, col) of the in-plane projection of ``point``; pixel centres at integers."""
        d = np.asarray(point, dtype=float) - self.position
        return float(d @ self.col_dir / self.spacing[0]), float(d @ self.row_dir / self.spacing[1])

    def coordinates(self, origin: np.ndarray, axes: tuple[np.ndarray, ...],
                    rows: slice = slice(None), cols: slice = slice(None)) -> list[np.ndarray]:
        """Coordinates of pixel centres along ``axes`` from ``origin`` (float32, rows x cols)."""
        i = np.arange(self.rows, dtype=np.float32)[rows]
        j = np.arange(self.cols, dtype=np.float32)[cols]
        out = []
        for axis in axes:
            start = np.float32((self.position - origin) @ axis)
            di = np.float32(self.spacing[0] * (self.col_dir @ axis))
            dj = np.float32(self.spacing[1] * (self.row_dir @ axis))
            out.append(np.add.outer(start + i * di, j * dj))
        return out

    def lps_grid(self, rows: slice = slice(None), cols: slice = slice(None)) -> list[np.ndarray]:
        return self.coordinates(np.zeros(3), tuple(np.eye(3)), rows, cols)

    def heart_grid(self, frame: HeartFrame, rows: slice = slice(None),
                   cols: slice = slice(None)) -> list[np.ndarray]:
        axes = (frame.septal, frame.anterior, frame.long)
        return self.coordinates(frame.origin, axes, rows, cols)


def _centred(centre: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, rows: int, cols: int,
             spacing: tuple[float, float]) -> Plane:
    position = (centre - (cols - 1) / 2 * spacing[1] * row_dir
                - (rows - 1) / 2 * spacing[0] * col_dir)
    return Plane(position, row_dir, col_dir, rows, cols, spacing)


def _rotate(row_dir: np.ndarray, col_dir: np.ndarray, degrees: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the in-plane axes about the normal (the operator's in-plane angle)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return c * row_dir + s * col_dir, -s * row_dir + c * col_dir


def sax_positions(anat: Anatomy, spacing_between_mm: float, max_slices: int | None = None
                  ) -> np.ndarray:
    """Long-axis positions (mm from the end-diastolic base) of a stack from base to apex.

    The first slice sits just apical of the end-systolic base, so every slice cuts the LV in
    every phase; the last one still holds some myocardium near the apex.
    """
    s_first = heart_state(anat, anat.es_fraction).s_base + 3.0
    s_apex = heart_state(anat, 0.0)
    s_last = s_apex.lv_centre_s + s_apex.l_epi - 5.0
    count = int((s_last - s_first) // spacing_between_mm) + 1
    if max_slices is not None:
        count = min(count, max_slices)
    return s_first + spacing_between_mm * np.arange(count)


def sax_stack(anat: Anatomy, rows: int, cols: int, spacing: tuple[float, float],
              spacing_between_mm: float, rng: np.random.Generator,
              max_slices: int | None = None, positions: np.ndarray | None = None) -> list[Plane]:
    """Short-axis planes, base to apex; the normal (row x column) points from apex to base."""
    frame = heart_frame(anat)
    in_plane = rng.uniform(-12, 12)
    row_dir, col_dir = _rotate(-frame.septal, -frame.anterior, in_plane)
    shift = rng.normal(0, 5, 2)
    offset = 0.25 * anat.epi_radius_mm * frame.septal + shift[0] * row_dir + shift[1] * col_dir
    if positions is None:
        positions = sax_positions(anat, spacing_between_mm, max_slices)
    return [_centred(frame.to_lps(0, 0, float(s)) + offset, row_dir, col_dir, rows, cols, spacing)
            for s in positions]


def lax_direction_deg(anat: Anatomy, view: str) -> float:
    """Heart-frame angle of the in-plane direction (perpendicular to the long axis) of a view.

    The +direction ends up on the image left: septum (4CH), inferior wall (2CH), outflow (3CH).
    """
    return {"4ch": 0.0, "2ch": -90.0, "3ch": anat.aorta_angle_deg}[view]


def lax_plane(anat: Anatomy, view: str, rows: int, cols: int, spacing: tuple[float, float],
              rng: np.random.Generator) -> Plane:
    """A long-axis cine plane containing the LV long axis, apex up."""
    if view not in LAX_VIEWS:
        raise ValueError(f"unknown long-axis view '{view}'; expected one of {LAX_VIEWS}")
    frame = heart_frame(anat)
    angle = math.radians(lax_direction_deg(anat, view))
    direction = math.cos(angle) * frame.septal + math.sin(angle) * frame.anterior
    row_dir, col_dir = _rotate(-direction, -frame.long, rng.uniform(-20, 20))
    shift = rng.normal(0, 5, 2)
    centre = frame.to_lps(0, 0, 0.28 * anat.lv_length_mm) + shift[0] * row_dir + shift[1] * col_dir
    return _centred(centre, row_dir, col_dir, rows, cols, spacing)
