"""A cardiac MR phantom defined in millimetres: chest, beating heart, labels.

Anatomy is analytic (ellipses and an ellipsoidal left ventricle in a heart frame), so every label
is exact at any resolution: images are rendered on a supersampled grid and box-averaged, which
gives partial volume at tissue borders. Sites then add their own contrast, noise (Rician),
coil bias field and resolution.

Conventions: image x runs along columns, y along rows, both in mm from the image centre. The
heart frame is rotated by ``Anatomy.heart_angle_deg`` in the image plane. ``z`` runs along the
LV long axis from the base (0) to the apex (1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared_model.labels import DISEASES, MASK_VALUES

BACKGROUND = 0
LV_BLOOD, LV_MYO, RV_BLOOD = MASK_VALUES["lv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["rv_blood"]


@dataclass(frozen=True)
class Anatomy:
    """One subject's heart and chest; lengths in mm, ``ef`` as a fraction."""

    disease: str
    lv_radius_mm: float  # end-diastolic endocardial radius at the base
    wall_mm: float  # end-diastolic wall thickness
    lv_length_mm: float  # base to apex
    rv_scale: float  # RV cavity size relative to the LV cavity
    ef: float  # LV ejection fraction
    rv_ef: float
    heart_angle_deg: float  # in-plane rotation of the heart frame
    heart_dx_mm: float  # LV centre offset from the image centre
    heart_dy_mm: float
    body_a_mm: float  # chest semi-axes
    body_b_mm: float
    fat_mm: float  # subcutaneous fat thickness
    texture_seed: int


@dataclass(frozen=True)
class Contrast:
    """Relative signal of each tissue in one sequence (before site scaling)."""

    blood: float
    myocardium: float
    fat: float
    muscle: float
    lung: float
    liver: float
    bone: float


BSSFP_CINE = Contrast(blood=1.0, myocardium=0.28, fat=0.85, muscle=0.32, lung=0.05,
                      liver=0.42, bone=0.25)


def sample_anatomy(rng: np.random.Generator, disease: str = "NOR") -> Anatomy:
    """A plausible subject of the given disease class (see DISEASES)."""
    if disease not in DISEASES:
        raise ValueError(f"unknown disease '{disease}'; expected one of {DISEASES}")
    radius, wall, ef, rv_scale, rv_ef = (rng.normal(24, 2.0), rng.normal(8.5, 0.8),
                                         rng.uniform(0.55, 0.7), rng.uniform(0.9, 1.1),
                                         rng.uniform(0.5, 0.62))
    if disease == "DCM":
        radius, wall, ef = rng.normal(33, 2.5), rng.normal(6.0, 0.6), rng.uniform(0.15, 0.35)
    elif disease == "HCM":
        radius, wall, ef = rng.normal(20, 1.5), rng.normal(16, 2.0), rng.uniform(0.65, 0.8)
    elif disease == "MINF":
        ef = rng.uniform(0.3, 0.45)
    elif disease == "ARV":
        rv_scale, rv_ef = rng.uniform(1.5, 1.9), rng.uniform(0.2, 0.38)
    return Anatomy(
        disease=disease, lv_radius_mm=float(radius), wall_mm=float(max(wall, 4.0)),
        lv_length_mm=float(rng.normal(85, 6)), rv_scale=float(rv_scale), ef=float(ef),
        rv_ef=float(rv_ef), heart_angle_deg=float(rng.uniform(-25, 25)),
        heart_dx_mm=float(rng.normal(0, 6)), heart_dy_mm=float(rng.normal(0, 6)),
        body_a_mm=float(rng.uniform(150, 185)), body_b_mm=float(rng.uniform(105, 130)),
        fat_mm=float(rng.uniform(6, 22)), texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def systolic_fraction(phase: float, t_es: float = 0.35) -> float:
    """0 at end-diastole, 1 at end-systole (``phase`` in [0, 1) of the R-R interval)."""
    phase = phase % 1.0
    if phase <= t_es:
        return 0.5 * (1 - math.cos(math.pi * phase / t_es))
    return 0.5 * (1 + math.cos(math.pi * (phase - t_es) / (1 - t_es)))


def lv_radii(anat: Anatomy, z: float, phase: float) -> tuple[float, float]:
    """(endocardial, epicardial) radius in mm at long-axis position ``z`` and ``phase``.

    The cavity shrinks with the ejection fraction; the myocardial area of the slice is kept,
    so the wall thickens in systole.
    """
    taper = math.sqrt(max(0.0, 1.0 - (0.92 * z) ** 2))
    r_endo_ed = anat.lv_radius_mm * taper
    r_epi_ed = r_endo_ed + anat.wall_mm * (0.8 + 0.2 * taper)
    volume_scale = 1.0 - anat.ef * systolic_fraction(phase)
    r_endo = r_endo_ed * math.sqrt(volume_scale)
    r_epi = math.sqrt(r_endo**2 + (r_epi_ed**2 - r_endo_ed**2))
    return r_endo, r_epi


def rv_extent(anat: Anatomy, z: float, phase: float) -> float:
    """RV cavity scale at ``z`` (0 where the RV has vanished toward the apex)."""
    if z >= 0.78:
        return 0.0
    volume_scale = 1.0 - anat.rv_ef * systolic_fraction(phase)
    return anat.rv_scale * (1.0 - z / 0.78) ** 0.6 * math.sqrt(volume_scale)


def _grid(shape: tuple[int, int], spacing_mm: float, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    step = spacing_mm / supersample
    ys = (np.arange(h * supersample) + 0.5) * step - h * spacing_mm / 2
    xs = (np.arange(w * supersample) + 0.5) * step - w * spacing_mm / 2
    return np.meshgrid(xs, ys)


def _heart_frame(anat: Anatomy, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(anat.heart_angle_deg)
    dx, dy = x - anat.heart_dx_mm, y - anat.heart_dy_mm
    return math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy


def sax_labels_fine(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: float,
                    phase: float, rv_dilate_mm: float = 0.0) -> np.ndarray:
    """Label map on the (fine) grid: LV blood pool, LV myocardium, RV blood pool."""
    u, v = _heart_frame(anat, x, y)
    r = np.hypot(u, v)
    r_endo, r_epi = lv_radii(anat, z, phase)
    labels = np.zeros(x.shape, dtype=np.uint8)
    labels[r <= r_epi] = LV_MYO
    labels[r <= r_endo] = LV_BLOOD
    scale = rv_extent(anat, z, phase)
    if scale > 0:
        # A crescent hugging the septum: an ellipse on the RV side, minus the LV and septum.
        b_rv = r_epi * 1.2 * scale + rv_dilate_mm
        a_rv = r_epi * 1.5 * scale + rv_dilate_mm
        cu = -0.6 * r_epi
        rv = ((u - cu) / b_rv) ** 2 + (v / a_rv) ** 2 <= 1.0
        rv &= (u < 0) & (r > r_epi + 1.0)
        labels[rv] = RV_BLOOD
    return labels


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency texture (filtered white noise in Fourier space)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    spectrum = np.fft.fft2(noise) * np.exp(-((fx**2 + fy**2) * (scale_px**2) * 2 * math.pi**2))
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.mean()) / (field.std() + 1e-8)


def chest_tissue_fine(anat: Anatomy, x: np.ndarray, y: np.ndarray,
                      contrast: Contrast) -> np.ndarray:
    """Signal of the chest around the heart: body, fat, lungs, spine, aorta, liver."""
    ex = (x / anat.body_a_mm) ** 2 + ((y - 15) / anat.body_b_mm) ** 2
    inner = (x / (anat.body_a_mm - anat.fat_mm)) ** 2 + ((y - 15) / (anat.body_b_mm - anat.fat_mm)) ** 2
    signal = np.where(ex <= 1, contrast.fat, 0.0)
    signal = np.where(inner <= 1, contrast.muscle, signal)
    for side in (-1, 1):
        lung = ((x - side * 85) / 62) ** 2 + ((y + 5) / 80) ** 2 <= 1
        signal = np.where(lung, contrast.lung, signal)
    mediastinum = ((x - anat.heart_dx_mm + 12) / 72) ** 2 + ((y - anat.heart_dy_mm) / 60) ** 2 <= 1
    signal = np.where(mediastinum, contrast.fat * 0.3 + contrast.muscle * 0.7, signal)
    spine = np.hypot(x, y - (anat.body_b_mm - 10)) <= 18
    signal = np.where(spine, contrast.bone, signal)
    aorta = np.hypot(x - 22, y - (anat.body_b_mm - 40)) <= 11
    signal = np.where(aorta, contrast.blood * 0.9, signal)
    liver = ((x + 60) / 70) ** 2 + ((y - 95) / 45) ** 2 <= 1
    return np.where(liver & (inner <= 1), contrast.liver, signal)


def box_downsample(fine: np.ndarray, factor: int) -> np.ndarray:
    h, w = fine.shape[0] // factor, fine.shape[1] // factor
    return fine.reshape(h, factor, w, factor).mean(axis=(1, 3))


def label_downsample(fine: np.ndarray, factor: int) -> np.ndarray:
    """Nearest label at each coarse pixel centre (labels stay exact, no blending)."""
    offset = factor // 2
    return fine[offset::factor, offset::factor]


@dataclass(frozen=True)
class Acquisition:
    """How a site images: grid, noise and scanner effects."""

    shape: tuple[int, int] = (128, 128)
    spacing_mm: float = 1.5
    noise_sigma: float = 0.03  # Rician noise, relative to blood signal
    intensity_scale: float = 1.0
    gamma: float = 1.0
    bias_strength: float = 0.25  # peak relative amplitude of the coil bias field
    supersample: int = 3


def render_sax(anat: Anatomy, z: float, phase: float, acq: Acquisition,
               rng: np.random.Generator, contrast: Contrast = BSSFP_CINE
               ) -> tuple[np.ndarray, np.ndarray]:
    """One SAX frame: (image float32 in scanner-like units, labels uint8), both ``acq.shape``."""
    x, y = _grid(acq.shape, acq.spacing_mm, acq.supersample)
    labels_fine = sax_labels_fine(anat, x, y, z, phase)
    signal = chest_tissue_fine(anat, x, y, contrast)
    u, v = _heart_frame(anat, x, y)
    r_epi = lv_radii(anat, z, phase)[1]
    epicardial_fat = np.hypot(u, v) <= r_epi + 5
    signal = np.where(epicardial_fat, contrast.fat * 0.8, signal)
    rv_wall = np.isin(sax_labels_fine(anat, x, y, z, phase, rv_dilate_mm=3.0), (RV_BLOOD,))
    signal = np.where(rv_wall, contrast.myocardium, signal)
    signal = np.where(labels_fine == LV_MYO, contrast.myocardium, signal)
    signal = np.where(np.isin(labels_fine, (LV_BLOOD, RV_BLOOD)), contrast.blood, signal)
    texture_rng = np.random.default_rng(anat.texture_seed)
    texture = _smooth_field(texture_rng, signal.shape, scale_px=6 * acq.supersample)
    signal = signal * (1 + 0.06 * texture)
    image = box_downsample(signal, acq.supersample)
    image = image * bias_field(acq.shape, acq.bias_strength, rng)
    image = np.clip(image, 0, None) ** acq.gamma * acq.intensity_scale
    image = rician(image, acq.noise_sigma * acq.intensity_scale, rng)
    return image.astype(np.float32), label_downsample(labels_fine, acq.supersample)


def bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative coil sensitivity profile, mean about 1."""
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    cx, cy = rng.uniform(-1.2, 1.2, size=2)
    field = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0)
    field = field / field.mean()
    return 1 + strength * (field - 1)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels."""
    real = image + rng.normal(0, sigma, image.shape)
    imag = rng.normal(0, sigma, image.shape)
    return np.hypot(real, imag)

