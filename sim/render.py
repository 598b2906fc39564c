"""Render phantom planes into images and label maps.

Cost model: the chest (everything that does not beat) is drawn once per plane; the heart is
redrawn per phase only inside the plane's heart box. Every tissue is laid over what is below it
with its analytic coverage (``sim.chest.coverage``), which gives partial volume at every border
without supersampling. Labels are the structures' signs at pixel centres. Scanner effects come
last: coil sensitivity, texture, vendor gamma and scale, Rician noise (magnitude images) or
Gaussian noise in ms (maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.chest import chest_signal, coil_sensitivity, coverage, paint, texture_field
from sim.phantom import (Anatomy, heart_box, heart_distances, heart_frame, heart_state,
                         labels_from_distances)
from sim.planes import Plane, sax_positions, sax_stack
from sim.sequences import BSSFP_CINE, TISSUE_INDEX, Contrast

__all__ = ["Acquisition", "PlaneRenderer", "plane_labels", "render_sax", "magnitude_image",
           "map_image",
           "rician", "bias_field", "Contrast", "BSSFP_CINE"]


class PlaneRenderer:
    """Frames of one plane of one subject, for ``contrasts`` (contrasts, tissues) at once."""

    def __init__(self, anat: Anatomy, plane: Plane, contrasts: np.ndarray) -> None:
        self.anat, self.plane = anat, plane
        self.contrasts = np.asarray(contrasts, dtype=np.float32)
        frame = heart_frame(anat)
        self.chest = chest_signal(anat, frame, plane, self.contrasts)
        self.pixel_mm = float(min(plane.spacing))
        a, b, s = plane.heart_grid(frame)
        lo, hi = heart_box(anat)
        inside = ((a >= lo[0]) & (a <= hi[0]) & (b >= lo[1]) & (b <= hi[1])
                  & (s >= lo[2]) & (s <= hi[2]))
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0:
            self.crop = None
            return
        self.crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        self.points = (a[self.crop], b[self.crop], s[self.crop])

    def frame(self, phase: float, scar_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(signal float32 (contrasts, rows, cols), labels uint8 (rows, cols)) at ``phase``."""
        signal = self.chest.copy()
        labels = np.zeros((self.plane.rows, self.plane.cols), dtype=np.uint8)
        if self.crop is None:
            return signal, labels
        d = heart_distances(self.anat, heart_state(self.anat, phase), *self.points)
        sub = signal[:, self.crop[0], self.crop[1]]
        v = {name: self.contrasts[:, i] for name, i in TISSUE_INDEX.items()}
        layers = [(d.epicardial_fat, 0.9 * v["fat"]), (d.atrial_walls, v["myocardium"]),
                  (d.aorta_outer, v["soft"]), (d.rv_outer, v["myocardium"]),
                  (d.lv_epi, v["myocardium"]), (d.scar, v["scar"]), (d.la, v["blood_left"]),
                  (d.ra, v["blood_right"]), (d.aorta, v["blood_left"]),
                  (d.rv_cavity, v["blood_right"]), (d.lv_endo, v["blood_left"])]
        for sd, values in layers:
            if sd is not None:
                paint(sub, coverage(sd, self.pixel_mm), values)
        signal[:, self.crop[0], self.crop[1]] = sub
        labels[self.crop] = labels_from_distances(d, with_scar=scar_label)
        return signal, labels

    def gain(self, bias_strength: float, coil_shift_mm: float, texture: float) -> np.ndarray:
        """Static multiplicative field of this plane: coil profile times tissue texture."""
        field = coil_sensitivity(self.anat, self.plane, bias_strength, coil_shift_mm)
        return field * (1 + np.float32(texture) * texture_field(self.anat, self.plane))


def plane_labels(anat: Anatomy, plane: Plane, phase: float, scar_label: bool = False
                 ) -> np.ndarray:
    """Mask values (uint8, rows x cols) of a plane at ``phase``, without drawing an image."""
    a, b, s = plane.heart_grid(heart_frame(anat))
    return labels_from_distances(heart_distances(anat, heart_state(anat, phase), a, b, s),
                                 with_scar=scar_label)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise of ``sigma`` in both channels."""
    real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def magnitude_image(signal: np.ndarray, gain: np.ndarray, gamma: float, scale: float,
                    noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Scanner magnitude image (float32, vendor units) from relative tissue signal."""
    image = np.clip(signal * gain, 0.0, None)
    if gamma != 1.0:
        image = image ** np.float32(gamma)
    return rician(image * np.float32(scale), noise_sigma * scale, rng)


def map_image(signal: np.ndarray, texture: np.ndarray, noise_ms: float,
              rng: np.random.Generator) -> np.ndarray:
    """Parametric map in ms: tissue values, 1 % texture, Gaussian fit noise; air stays 0."""
    noise = np.float32(noise_ms) * rng.standard_normal(signal.shape, dtype=np.float32)
    image = signal * (1 + np.float32(0.01) * texture) + noise * (signal > 1).astype(np.float32)
    return np.clip(image, 0.0, None)


@dataclass(frozen=True)
class Acquisition:
    """How a (store-writing) site images a SAX frame: grid, noise and scanner effects."""

    shape: tuple[int, int] = (128, 128)
    spacing_mm: float = 1.5
    noise_sigma: float = 0.03  # Rician noise, relative to blood signal
    intensity_scale: float = 1.0
    gamma: float = 1.0
    bias_strength: float = 0.25  # peak relative amplitude of the coil bias field


def bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative profile in image space, mean about 1 (for images without a
    patient geometry; planes use ``sim.chest.coil_sensitivity``)."""
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    cx, cy = rng.uniform(-1.2, 1.2, size=2)
    field = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0)
    return (1 + strength * (field / field.mean() - 1)).astype(np.float32)


def render_sax(anat: Anatomy, z: float, phase: float, acq: Acquisition, rng: np.random.Generator,
               contrast: Contrast = BSSFP_CINE) -> tuple[np.ndarray, np.ndarray]:
    """One SAX frame centred on the LV: (image float32, labels uint8), both ``acq.shape``.

    ``z`` runs from the basal (0) to the apical (1) end of the stack that ``sax_positions``
    plans, so every ``z`` in [0, 1] cuts the LV.
    """
    positions = sax_positions(anat, 1.0)
    s = positions[0] + float(np.clip(z, 0, 1)) * (positions[-1] - positions[0])
    plane = sax_stack(anat, *acq.shape, (acq.spacing_mm, acq.spacing_mm), 10.0,
                      np.random.default_rng(anat.texture_seed), positions=np.array([s]))[0]
    renderer = PlaneRenderer(anat, plane, contrast.vector()[None])
    signal, labels = renderer.frame(phase)
    gain = renderer.gain(acq.bias_strength, float(rng.uniform(-80, 80)), 0.05)
    image = magnitude_image(signal[0], gain, acq.gamma, acq.intensity_scale, acq.noise_sigma, rng)
    return image, labels
