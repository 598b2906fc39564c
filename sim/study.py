"""One subject's CMR study: which series a site acquires, rendered with their labels.

A study holds cine SAX (base to apex) and cine 2CH/3CH/4CH, LGE SAX, native T1 and T2 maps
(basal, mid, apical slices), T2-weighted dark-blood STIR SAX and a first-pass perfusion series
(three slices, one dynamic per heartbeat). Pixel values come out as the integers a scanner would
store (``SeriesData.pixels``), with masks on the labelled frames and landmarks in the pixel
coordinates of the frames they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared_model.labels import MASK_VALUES
from sim.phantom import (Anatomy, end_systolic_phase, heart_frame, heart_state, lv_apex_point,
                         mitral_hinge_points, rv_insertion_points)
from sim.planes import Plane, lax_direction_deg, lax_plane, sax_positions, sax_stack
from sim.render import PlaneRenderer, magnitude_image, map_image
from sim.sequences import MAP_NOISE_MS, TISSUES, contrast_for, perfusion_contrasts
from sim.sites import SiteProfile

MAP_SLOPE = {"t1_map": 1.0, "t2_map": 0.1}  # stored integer x slope = ms
# Structures each labelled series annotates (others are left as background in its masks).
_SAX_LV = ("lv_blood", "lv_myo")
MASKED_STRUCTURES = {
    ("cine", "sax"): _SAX_LV + ("rv_blood",),
    ("cine", "4ch"): _SAX_LV + ("rv_blood", "la_blood", "ra_blood"),
    ("cine", "2ch"): _SAX_LV + ("la_blood",),
    ("cine", "3ch"): _SAX_LV + ("la_blood", "rv_blood"),
    ("lge", "sax"): _SAX_LV + ("scar",),
    ("t1_map", "sax"): _SAX_LV,
    ("t2_map", "sax"): _SAX_LV,
}
DIASTOLE = 0.72  # trigger delay (fraction of R-R) of single-phase acquisitions
PERFUSION_PHASES = (0.12, 0.32, 0.52)  # each perfusion slice has its own trigger delay


@dataclass(frozen=True)
class StudyOptions:
    """Knobs that shrink a study (tests); ``None`` keeps the site's protocol."""

    cine_phases: int | None = None
    max_sax_slices: int | None = None
    perfusion_dynamics: int | None = None


@dataclass
class SeriesData:
    """One acquisition: frames (slices, phases) in planned order, stored integers, labels."""

    sequence: str
    view: str
    planes: list[Plane]  # one per slice, in acquisition order
    trigger_ms: np.ndarray  # (slices, phases) TriggerTime of each frame
    pixels: np.ndarray  # (slices, phases, rows, cols) uint16 stored values
    rescale_slope: float
    dynamic: bool = False  # phases are perfusion dynamics (one per heartbeat), not cardiac phases
    masks: np.ndarray | None = None  # (slices, phases, rows, cols) uint8, zero off labelled phases
    labeled_phases: list[int] = field(default_factory=list)
    landmarks: list[tuple[int, int, str, float, float]] = field(default_factory=list)
    lge_pathology: str = ""  # "scar" / "no_scar" for LGE

    @property
    def num_frames(self) -> int:
        return int(self.pixels.shape[0] * self.pixels.shape[1])


def _store(values: np.ndarray, slope: float, bits: int) -> np.ndarray:
    return np.clip(np.rint(values / np.float32(slope)), 0, 2**bits - 1).astype(np.uint16)


def vendor_jitter(site: SiteProfile) -> np.ndarray:
    """Per-tissue factors (about 1) for a vendor's own protocol flavour, fixed per vendor/field."""
    key = sum(map(ord, site.vendor + site.model))
    return np.random.default_rng([key, int(site.field_strength_t * 10)]).uniform(
        0.9, 1.1, len(TISSUES)).astype(np.float32)


def _render_planes(anat: Anatomy, site: SiteProfile, sequence: str, view: str,
                   planes: list[Plane], phases: np.ndarray, labeled: list[int],
                   rng: np.random.Generator,
                   scar_label: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored pixels and masks for frames at ``phases`` (fractions of R-R) on each plane."""
    contrasts = contrast_for(sequence, site.field_strength_t, vendor_jitter(site))
    is_map = sequence in MAP_SLOPE
    slope = MAP_SLOPE[sequence] if is_map else site.rescale_slope
    shape = (len(planes), len(phases), planes[0].rows, planes[0].cols)
    pixels = np.zeros(shape, dtype=np.uint16)
    masks = np.zeros(shape, dtype=np.uint8) if labeled else None
    coil_shift = float(rng.uniform(-60, 60))
    keep = np.zeros(256, dtype=bool)
    keep[[MASK_VALUES[name] for name in MASKED_STRUCTURES.get((sequence, view), ())]] = True
    for s, plane in enumerate(planes):
        renderer = PlaneRenderer(anat, plane, contrasts)
        gain = (renderer.gain(0.0, coil_shift, 1.0) - 1 if is_map
                else renderer.gain(site.bias_strength, coil_shift, 0.05))
        for t, phase in enumerate(phases):
            signal, labels = renderer.frame(float(phase), scar_label)
            if is_map:
                image = map_image(signal[0], gain, MAP_NOISE_MS[sequence], rng)
            else:
                image = magnitude_image(signal[0], gain, site.gamma, site.intensity_scale,
                                        site.noise_sigma, rng)
            pixels[s, t] = _store(image, slope, site.bits_stored)
            if masks is not None and t in labeled:
                masks[s, t] = np.where(keep[labels], labels, 0)
    return pixels, masks


def _sax_landmarks(anat: Anatomy, planes: list[Plane], positions: np.ndarray,
                   phases: np.ndarray, labeled: list[int]) -> list[tuple]:
    frame, found = heart_frame(anat), []
    for t in labeled:
        st = heart_state(anat, float(phases[t]))
        for k, (plane, s) in enumerate(zip(planes, positions)):
            points = rv_insertion_points(anat, st, float(s))
            if points is None:
                continue
            for name, point in zip(("rv_insertion_anterior", "rv_insertion_inferior"), points):
                found.append((k, t, name, *plane.lps_to_pixel(frame.to_lps(*point))))
    return found


def _lax_landmarks(anat: Anatomy, view: str, plane: Plane, phases: np.ndarray,
                   labeled: list[int]) -> list[tuple]:
    """Mitral hinges (hinge 1 = the one at the smaller column) and the LV apex."""
    frame, found = heart_frame(anat), []
    for t in labeled:
        st = heart_state(anat, float(phases[t]))
        hinges = sorted((plane.lps_to_pixel(frame.to_lps(*p))
                         for p in mitral_hinge_points(anat, st, lax_direction_deg(anat, view))),
                        key=lambda rc: rc[1])
        apex = plane.lps_to_pixel(frame.to_lps(*lv_apex_point(st)))
        for name, rc in zip(("mitral_hinge_1", "mitral_hinge_2", "lv_apex"), (*hinges, apex)):
            found.append((0, t, name, *rc))
    return found


def _three_slices(count: int) -> list[int]:
    """Basal, mid and apical picks of a stack, evenly spaced (one NIfTI affine fits them)."""
    if count < 4:
        return list(range(count))
    step = (count - 2) // 2
    return [1, 1 + step, 1 + 2 * step]


def _cine_phases(anat: Anatomy, count: int) -> tuple[np.ndarray, list[int]]:
    phases = np.arange(count) / count
    return phases, sorted({0, end_systolic_phase(anat, count)})


def render_study(anat: Anatomy, site: SiteProfile, rng: np.random.Generator,
                 options: StudyOptions = StudyOptions()) -> list[SeriesData]:
    """All series of one study, in the order the site acquires them."""
    spacing = (site.pixel_spacing_mm, site.pixel_spacing_mm)
    rows, cols = site.matrix
    rr = anat.rr_ms
    phases, labeled = _cine_phases(anat, options.cine_phases or site.cine_phases)
    trig = (phases * rr)[None]
    series = []
    for view in ("2ch", "4ch", "3ch"):
        plane = lax_plane(anat, view, rows, cols, spacing, rng)
        pixels, masks = _render_planes(anat, site, "cine", view, [plane], phases, labeled, rng)
        series.append(SeriesData("cine", view, [plane], trig, pixels, site.rescale_slope,
                                 masks=masks, labeled_phases=labeled,
                                 landmarks=_lax_landmarks(anat, view, plane, phases, labeled)))
    positions = sax_positions(anat, site.spacing_between_slices_mm, options.max_sax_slices)
    stack = sax_stack(anat, rows, cols, spacing, site.spacing_between_slices_mm, rng,
                      positions=positions)
    pixels, masks = _render_planes(anat, site, "cine", "sax", stack, phases, labeled, rng)
    series.append(SeriesData("cine", "sax", stack, np.repeat(trig, len(stack), 0), pixels,
                             site.rescale_slope, masks=masks, labeled_phases=labeled,
                             landmarks=_sax_landmarks(anat, stack, positions, phases, labeled)))
    series.append(_perfusion(anat, site, positions, rng, options))
    thirds = [stack[i] for i in _three_slices(len(stack))]
    for sequence in ("t1_map", "t2_map"):
        series.append(_single_phase(anat, site, sequence, thirds, rng, labeled=True))
    series.append(_single_phase(anat, site, "t2w", stack, rng, labeled=False))
    lge = _single_phase(anat, site, "lge", stack, rng, labeled=True)
    lge.lge_pathology = "scar" if anat.scar is not None else "no_scar"
    series.append(lge)
    return series


def _single_phase(anat: Anatomy, site: SiteProfile, sequence: str, planes: list[Plane],
                  rng: np.random.Generator, labeled: bool) -> SeriesData:
    phases = np.array([DIASTOLE])
    pixels, masks = _render_planes(anat, site, sequence, "sax", planes, phases,
                                   [0] if labeled else [],
                                   rng, scar_label=sequence == "lge")
    slope = MAP_SLOPE.get(sequence, site.rescale_slope)
    trig = np.full((len(planes), 1), DIASTOLE * anat.rr_ms)
    return SeriesData(sequence, "sax", planes, trig, pixels, slope, masks=masks,
                      labeled_phases=[0] if labeled else [])


def _perfusion(anat: Anatomy, site: SiteProfile, positions: np.ndarray,
               rng: np.random.Generator, options: StudyOptions) -> SeriesData:
    """Three SAX slices (basal, mid, apical), each at its own trigger delay, over dynamics."""
    dynamics = options.perfusion_dynamics or site.perfusion_dynamics
    contrasts = perfusion_contrasts(dynamics, site.field_strength_t) * vendor_jitter(site)
    spacing = (site.pixel_spacing_mm, site.pixel_spacing_mm)
    picks = positions[_three_slices(len(positions))]
    planes = sax_stack(anat, *site.matrix, spacing, site.spacing_between_slices_mm, rng,
                       positions=picks)
    pixels = np.zeros((len(planes), dynamics, *site.matrix), dtype=np.uint16)
    coil_shift = float(rng.uniform(-60, 60))
    for s, (plane, phase) in enumerate(zip(planes, PERFUSION_PHASES)):
        renderer = PlaneRenderer(anat, plane, contrasts)
        gain = renderer.gain(site.bias_strength * 1.3, coil_shift, 0.05)
        signal, _ = renderer.frame(phase)
        for d in range(dynamics):
            image = magnitude_image(signal[d], gain, site.gamma, site.intensity_scale,
                                    site.noise_sigma, rng)
            pixels[s, d] = _store(image, site.rescale_slope, site.bits_stored)
    trig = np.repeat(np.array(PERFUSION_PHASES[: len(planes)])[:, None] * anat.rr_ms, dynamics, 1)
    return SeriesData("perfusion", "sax", planes, trig, pixels, site.rescale_slope, dynamic=True)
