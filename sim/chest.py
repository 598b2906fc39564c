"""The static chest around the heart, in patient coordinates (LPS mm), and scanner fields.

The body is an elliptic cylinder along the patient's z axis: subcutaneous fat, chest-wall muscle,
lungs in the thoracic cavity, a mediastinum of soft tissue and fat around the heart, the spine
(vertebral body, spinal canal), the descending aorta, and below the diaphragm dome the liver
(right) and other abdominal organs (left). A plane through it is an oblique cut like any other,
so backgrounds differ between views and slices. Texture and the coil sensitivity are smooth 3-D
fields, consistent across the planes of one subject.
"""

from __future__ import annotations

import math

import numpy as np

from sim.phantom import Anatomy, HeartFrame
from sim.planes import Plane
from sim.sequences import TISSUE_INDEX

CHEST_WALL_MM = 14.0


def coverage(sd: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fraction of a pixel inside a shape from the signed distance at its centre (linear ramp
    one pixel wide): analytic partial volume without supersampling."""
    return np.clip(np.float32(0.5) - sd * np.float32(1.0 / pixel_mm), 0.0, 1.0)


def paint(signal: np.ndarray, alpha: np.ndarray, values: np.ndarray) -> None:
    """Lay a tissue with coverage ``alpha`` over ``signal`` (contrasts, rows, cols), in place."""
    if signal.shape[0] == 1:
        signal[0] += alpha * (values[0] - signal[0])
    else:
        signal += alpha[None] * (values[:, None, None] - signal)


def ellipse_sd(u: np.ndarray, v: np.ndarray, ru: float, rv: float) -> np.ndarray:
    k0 = np.sqrt((u / ru) ** 2 + (v / rv) ** 2)
    k1 = np.sqrt((u / ru**2) ** 2 + (v / rv**2) ** 2)
    return (k0 - 1) * (k0 + 1e-6) / (k1 + 1e-6 / min(ru, rv))


def diaphragm_z(anat: Anatomy, x: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm: a higher right dome over the liver, a left one under the
    heart, placed below the LV apex."""
    apex_z = anat.base_centre_lps[2] + anat.lv_length_mm * anat.long_axis[2]
    low = apex_z - 30.0
    return (low + 38 * np.exp(-(((x + 55) / 70) ** 2)) + 22 * np.exp(-(((x - 70) / 55) ** 2)))


def chest_signal(anat: Anatomy, frame: HeartFrame, plane: Plane, contrasts: np.ndarray
                 ) -> np.ndarray:
    """Signal (contrasts, rows, cols) of everything but the heart, with partial volume."""
    x, y, z = plane.lps_grid()
    a, b, s = plane.heart_grid(frame)
    px = float(min(plane.spacing))
    values = {name: contrasts[:, i] for name, i in TISSUE_INDEX.items()}
    signal = np.zeros((contrasts.shape[0], plane.rows, plane.cols), dtype=np.float32)
    ba, bb = anat.body_a_mm, anat.body_b_mm
    body = ellipse_sd(x, y, ba, bb)
    paint(signal, coverage(body, px), values["fat"])
    paint(signal, coverage(body + anat.fat_mm, px), values["muscle"])
    cavity = ellipse_sd(x, y + 8, ba - anat.fat_mm - CHEST_WALL_MM,
                        bb - anat.fat_mm - CHEST_WALL_MM - 12)
    above = diaphragm_z(anat, x) - z  # < 0 above the diaphragm
    paint(signal, coverage(np.maximum(cavity, above), px), values["lung"])
    paint(signal, coverage(np.maximum(cavity - 6, -above), px), values["soft"])
    paint(signal, coverage(np.maximum(np.maximum(cavity - 6, -above), x - 55), px), values["liver"])
    column, pericardial = _mediastinum(anat, x, y, above, a, b, s)
    paint(signal, coverage(column, px), values["soft"])
    paint(signal, pericardial, 0.35 * values["fat"] + 0.65 * values["soft"])
    spine_y = bb - 45
    paint(signal, coverage(np.hypot(x, y - spine_y) - 17, px), values["marrow"])
    paint(signal, coverage(np.hypot(x, y - spine_y - 24) - 7, px), values["csf"])
    paint(signal, coverage(np.hypot(x - 21, y - spine_y + 24) - 11, px), values["blood_left"])
    return signal


def _mediastinum(anat: Anatomy, x: np.ndarray, y: np.ndarray, above: np.ndarray, a: np.ndarray,
                 b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of the soft-tissue column from sternum to spine between the lungs, and
    the (smooth-edged) coverage of the fatty envelope around the heart."""
    ref, length = anat.epi_radius_mm, anat.lv_length_mm
    column = np.maximum(np.abs(x - 5) - 28, above)
    column = np.maximum(column, ellipse_sd(x, y + 8, anat.body_a_mm, anat.body_b_mm - 20))
    da, db, ds = a - 0.4 * ref, b, s - 0.25 * length
    k0 = np.sqrt((da / (1.7 * ref + 8)) ** 2 + (db / (1.4 * ref + 8)) ** 2
                 + (ds / (0.85 * length + 8)) ** 2)
    return column, np.clip((1.0 - k0) * 12.0, 0.0, 1.0).astype(np.float32)


def texture_field(anat: Anatomy, plane: Plane, waves: int = 8) -> np.ndarray:
    """Smooth zero-mean, unit-variance texture: random 3-D plane waves (12-45 mm wavelength),
    seeded by the subject so that every plane of a subject sees the same tissue."""
    rng = np.random.default_rng(anat.texture_seed)
    x, y, z = plane.lps_grid()
    field = np.zeros_like(x)
    for _ in range(waves):
        direction = rng.normal(size=3)
        k = 2 * math.pi / rng.uniform(12, 45) * direction / np.linalg.norm(direction)
        phase = np.float32(rng.uniform(0, 2 * math.pi))
        field += np.cos(np.float32(k[0]) * x + np.float32(k[1]) * y + np.float32(k[2]) * z + phase)
    return field * np.float32(math.sqrt(2.0 / waves))


def coil_sensitivity(anat: Anatomy, plane: Plane, strength: float, lateral_mm: float) -> np.ndarray:
    """Multiplicative receive-coil profile: anterior and posterior arrays, brighter near the
    chest wall and the back, about 1 at the heart; ``lateral_mm`` shifts it sideways."""
    x, y, _ = plane.lps_grid()
    bb = anat.body_b_mm
    profile = (np.exp(-(((x - lateral_mm) / 260) ** 2))
               * (np.exp(-(y + bb) / 110) + np.exp((y - bb) / 110)))
    heart_x, heart_y = anat.base_centre_lps[0], anat.base_centre_lps[1]
    at_heart = math.exp(-(((heart_x - lateral_mm) / 260) ** 2)) * (
        math.exp(-(heart_y + bb) / 110) + math.exp((heart_y - bb) / 110))
    return (1 + strength * (profile / at_heart - 1)).clip(0.2, None).astype(np.float32)
