"""A 3-D cardiac phantom in patient coordinates (LPS, mm): anatomy, motion, labels, landmarks.

The heart lives in its own frame, placed in the patient by ``Anatomy.base_centre_lps`` and two
unit vectors: ``long_axis`` (base -> apex) and ``septal_axis`` (LV -> RV, perpendicular to it).
Heart-frame coordinates are ``a`` (along the septal axis), ``b`` (along ``anterior_axis`` =
septal x long; anterior wall) and ``s`` (mm along the long axis from the end-diastolic mitral
plane). The in-plane angle ``theta = atan2(b, a)`` is 0 deg at the septum, +90 at the anterior
wall, 180 lateral, -90 inferior.

Structures are analytic and given as approximate signed distances in mm (negative inside):

- LV: a truncated prolate spheroid (endocardium, epicardium with the same centre), cut at the
  mitral (base) plane. Over the R-R interval the cavity volume follows the ejection fraction,
  the long axis shortens with the apex fixed (the base descends), and the wall thickens so that
  the myocardial volume is conserved.
- RV: an ellipsoid beside the septum minus the LV: a crescent that wraps the septum, ends at the
  two RV insertion points and vanishes toward the apex; a thin free wall.
- LA / RA: ellipsoids beyond the mitral / tricuspid plane, split by an atrial septum.
- Aorta: a tube leaving the base anteroseptally (seen in 3CH).
- MINF: scar in one coronary territory (LAD anterior/septal, RCA inferior, LCx lateral), from
  subendocardial to transmural, and regional hypokinesis of the same territory.

Labels are the structures' signs at pixel centres (exact); images use the same distances for
analytic partial volume (``sim.render``). Landmarks are computed from the same functions, so
masks, landmarks and disease classes agree by construction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.labels import DISEASES, MASK_VALUES

BACKGROUND = 0
LV_BLOOD, LV_MYO, RV_BLOOD = MASK_VALUES["lv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["rv_blood"]
LA_BLOOD, RA_BLOOD, SCAR = MASK_VALUES["la_blood"], MASK_VALUES["ra_blood"], MASK_VALUES["scar"]

# The LV spheroid's centre lies apical of the base plane by this fraction of its semi-axis.
LV_CENTRE_FRACTION = 0.45
RV_WALL_MM, ATRIAL_WALL_MM, AORTIC_WALL_MM, EPICARDIAL_FAT_MM = 3.5, 2.0, 2.0, 3.0
# Coronary territories: (centre angle deg, half-width deg, base fraction, apex fraction).
TERRITORIES: dict[str, tuple[float, float, float, float]] = {
    "LAD": (55.0, 55.0, 0.30, 1.05),  # anterior wall and anterior septum, mid to apex
    "RCA": (-80.0, 45.0, 0.0, 0.70),  # inferior wall and inferior septum, base to mid
    "LCx": (-160.0, 45.0, 0.0, 0.75),  # lateral / inferolateral wall, base to mid
}


@dataclass(frozen=True)
class Scar:
    """An infarct: a coronary territory and how far the scar reaches from the endocardium."""

    territory: str
    transmurality: float  # fraction of the wall from the endocardium (1 = transmural)

    @property
    def centre_deg(self) -> float:
        return TERRITORIES[self.territory][0]


@dataclass(frozen=True)
class Anatomy:
    """One subject's heart and chest; lengths in mm, fractions of 1, angles in degrees."""

    disease: str
    base_centre_lps: tuple[float, float, float]  # mitral-plane centre at end-diastole
    long_axis: tuple[float, float, float]  # unit, base -> apex
    septal_axis: tuple[float, float, float]  # unit, LV -> RV, perpendicular to long_axis
    lv_radius_mm: float  # end-diastolic endocardial semi-axis (widest cavity radius)
    wall_mm: float  # end-diastolic lateral wall thickness
    septal_ratio: float  # septal / lateral wall thickness (asymmetric HCM > 1)
    lv_length_mm: float  # end-diastolic base-to-apex endocardial length
    ef: float  # LV ejection fraction of normally contracting myocardium
    shortening: float  # long-axis shortening at end-systole, fraction of the length
    rv_scale: float  # RV size relative to a normal RV
    rv_ef: float
    la_scale: float
    ra_scale: float
    aorta_angle_deg: float  # direction of the outflow tract in the heart frame
    aorta_radius_mm: float
    es_fraction: float  # end-systole as a fraction of the R-R interval
    heart_rate_bpm: float
    scar: Scar | None
    hypokinesis: float  # fraction of the endocardial excursion lost in the scar territory
    body_a_mm: float  # chest semi-axes (left-right, anterior-posterior)
    body_b_mm: float
    fat_mm: float  # subcutaneous fat thickness
    texture_seed: int

    @property
    def rr_ms(self) -> float:
        return 60000.0 / self.heart_rate_bpm

    @property
    def epi_radius_mm(self) -> float:
        """End-diastolic epicardial radius: the reference size for RV, atria and planning."""
        return self.lv_radius_mm + self.wall_mm


@dataclass(frozen=True, eq=False)
class HeartFrame:
    """Origin and unit axes of the heart frame in LPS mm."""

    origin: np.ndarray
    septal: np.ndarray  # a
    anterior: np.ndarray  # b
    long: np.ndarray  # s

    def to_lps(self, a: float, b: float, s: float) -> np.ndarray:
        return self.origin + a * self.septal + b * self.anterior + s * self.long

    def from_lps(self, point: np.ndarray) -> np.ndarray:
        d = np.asarray(point, dtype=float) - self.origin
        return np.array([d @ self.septal, d @ self.anterior, d @ self.long])


def heart_frame(anat: Anatomy) -> HeartFrame:
    long = np.asarray(anat.long_axis, dtype=float)
    septal = np.asarray(anat.septal_axis, dtype=float)
    return HeartFrame(np.asarray(anat.base_centre_lps, dtype=float), septal,
                      np.cross(septal, long), long)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _heart_pose(rng: np.random.Generator) -> tuple[tuple, tuple, tuple]:
    """Base centre and axes: apex left-anterior-inferior, RV right-anterior of the LV."""
    long = _unit(np.array([0.62, -0.52, -0.58]) + rng.normal(0, 0.07, 3))
    toward_rv = np.array([-0.6, -0.75, 0.25]) + rng.normal(0, 0.08, 3)
    septal = _unit(toward_rv - (toward_rv @ long) * long)
    base = np.array([8.0, -22.0, 28.0]) + rng.normal(0, 4.0, 3)
    return tuple(map(float, base)), tuple(map(float, long)), tuple(map(float, septal))


# Per disease: radius, wall, septal ratio, EF, RV scale, RV EF, LA scale, RA scale (as draws).
def _disease_shape(rng: np.random.Generator, disease: str) -> dict[str, float]:
    shape = dict(lv_radius_mm=rng.normal(24, 1.6), wall_mm=rng.normal(8.5, 0.6), septal_ratio=1.0,
                 ef=rng.uniform(0.56, 0.68), rv_scale=rng.uniform(0.92, 1.08),
                 rv_ef=rng.uniform(0.5, 0.62), la_scale=1.0, ra_scale=1.0)
    if disease == "DCM":
        shape.update(lv_radius_mm=rng.normal(33, 1.8), wall_mm=rng.normal(6.0, 0.4),
                     ef=rng.uniform(0.15, 0.32), la_scale=rng.uniform(1.15, 1.35))
    elif disease == "HCM":
        shape.update(lv_radius_mm=rng.normal(19.5, 1.2), wall_mm=rng.normal(14.0, 1.2),
                     septal_ratio=rng.uniform(1.2, 1.5), ef=rng.uniform(0.68, 0.8),
                     la_scale=rng.uniform(1.1, 1.3))
    elif disease == "MINF":
        shape.update(lv_radius_mm=rng.normal(27, 1.6), ef=rng.uniform(0.45, 0.55))
    elif disease == "ARV":
        shape.update(rv_scale=rng.uniform(1.5, 1.8), rv_ef=rng.uniform(0.2, 0.35),
                     ra_scale=rng.uniform(1.15, 1.35))
    return {k: float(v) for k, v in shape.items()}


def sample_anatomy(rng: np.random.Generator, disease: str = "NOR") -> Anatomy:
    """A plausible subject of the given disease class (see ``shared_model.labels.DISEASES``)."""
    if disease not in DISEASES:
        raise ValueError(f"unknown disease '{disease}'; expected one of {DISEASES}")
    base, long, septal = _heart_pose(rng)
    shape = _disease_shape(rng, disease)
    scar, hypokinesis = None, 0.0
    if disease == "MINF":
        territory = str(rng.choice(sorted(TERRITORIES)))
        scar = Scar(territory, float(rng.choice([rng.uniform(0.3, 0.5), rng.uniform(0.75, 1.0)])))
        hypokinesis = float(rng.uniform(0.75, 0.95))
    return Anatomy(
        disease=disease, base_centre_lps=base, long_axis=long, septal_axis=septal,
        lv_length_mm=float(rng.normal(88, 5)) * (1.1 if disease == "DCM" else 1.0),
        shortening=float(0.2 * shape["ef"] + rng.uniform(0.0, 0.02)),
        aorta_angle_deg=float(rng.uniform(40, 60)), aorta_radius_mm=float(rng.uniform(11, 14)),
        es_fraction=float(rng.uniform(0.32, 0.38)), heart_rate_bpm=float(rng.uniform(55, 85)),
        scar=scar, hypokinesis=hypokinesis,
        body_a_mm=float(rng.uniform(150, 180)), body_b_mm=float(rng.uniform(108, 128)),
        fat_mm=float(rng.uniform(6, 20)), texture_seed=int(rng.integers(0, 2**31 - 1)), **shape,
    )


def systolic_fraction(phase: float, t_es: float = 0.35) -> float:
    """0 at end-diastole, 1 at end-systole (``phase`` in [0, 1) of the R-R interval)."""
    phase = phase % 1.0
    if phase <= t_es:
        return 0.5 * (1 - math.cos(math.pi * phase / t_es))
    return 0.5 * (1 + math.cos(math.pi * (phase - t_es) / (1 - t_es)))


def _cap_volume(radius: float, semi_axis: float, centre_offset: float) -> float:
    """Volume (mm^3) of a spheroid cut by a plane ``centre_offset`` mm behind its centre."""
    k = min(centre_offset / semi_axis, 1.0)
    return math.pi * radius**2 * semi_axis * (2 / 3 + k - k**3 / 3)


@dataclass(frozen=True)
class HeartState:
    """Everything that moves, at one instant of the R-R interval (heart frame, mm)."""

    systole: float  # 0 end-diastole .. 1 end-systole
    s_base: float  # mitral / tricuspid plane
    lv_centre_s: float
    r_endo: float
    l_endo: float
    r_epi: float
    l_epi: float
    septal_extra_mm: float  # extra septal thickness (HCM)
    hypo_mm: float  # endocardial radius kept in the hypokinetic territory
    rv_centre: tuple[float, float, float]
    rv_axes: tuple[float, float, float]
    rv_guard_a: float  # the RV cavity lies at a >= this
    la_centre: tuple[float, float, float]
    la_axes: tuple[float, float, float]
    ra_centre: tuple[float, float, float]
    ra_axes: tuple[float, float, float]
    atrial_septum_a: float
    aorta_start: tuple[float, float, float]
    aorta_dir: tuple[float, float, float]
    aorta_length: float
    aorta_radius: float


def _epi_scale(anat: Anatomy, r: float, l_endo: float, c: float, myo_volume: float) -> float:
    """Wall-thickness factor h that keeps the myocardial volume (bisection, monotone in h)."""
    w, wa = anat.wall_mm, 0.8 * anat.wall_mm
    cavity = _cap_volume(r, l_endo, c)
    lo, hi = 0.2, 6.0
    for _ in range(40):
        h = 0.5 * (lo + hi)
        if _cap_volume(r + h * w, l_endo + h * wa, c) - cavity < myo_volume:
            lo = h
        else:
            hi = h
    return 0.5 * (lo + hi)


def _lv_motion(anat: Anatomy, f: float) -> dict[str, Any]:
    k = LV_CENTRE_FRACTION
    l0 = anat.lv_length_mm / (1 + k)
    r0 = anat.lv_radius_mm
    myo0 = (_cap_volume(r0 + anat.wall_mm, l0 + 0.8 * anat.wall_mm, k * l0)
            - _cap_volume(r0, l0, k * l0))
    length = l0 * (1 - anat.shortening * f)
    r = r0 * math.sqrt((1 - anat.ef * f) / (1 - anat.shortening * f))
    s_base = (1 + k) * (l0 - length)  # apex fixed: the base descends
    h = _epi_scale(anat, r, length, k * length, myo0)
    return dict(s_base=s_base, lv_centre_s=s_base + k * length, r_endo=r, l_endo=length,
                r_epi=r + h * anat.wall_mm, l_epi=length + 0.8 * h * anat.wall_mm,
                septal_extra_mm=h * anat.wall_mm * (anat.septal_ratio - 1),
                hypo_mm=anat.hypokinesis * (r0 - r))


def _base_radius(r: float) -> float:
    """Endocardial radius at the base plane (the mitral annulus)."""
    return r * math.sqrt(1 - LV_CENTRE_FRACTION**2)


def _rv_motion(anat: Anatomy, f: float, s_base: float) -> dict:
    """RV ellipsoid beside the septum: the free wall moves in systole, the septum stays."""
    ref, dil = anat.epi_radius_mm, anat.rv_scale - 1
    length_now = anat.lv_length_mm - s_base
    free = math.sqrt(1 - anat.rv_ef * f)
    return dict(rv_centre=(ref * (0.55 + 0.5 * dil), 0.0, s_base + 0.1 * length_now),
                rv_axes=(ref * (1.35 + 0.8 * dil) * free, ref * (1.08 + 0.15 * dil) * free**0.3,
                         length_now * (0.8 + 0.1 * dil)),
                rv_guard_a=0.1 * ref)


def _atria(anat: Anatomy, f: float, lv: dict) -> dict:
    """LA over the mitral annulus, RA over the RV; both fill while the ventricles empty."""
    ref = anat.epi_radius_mm
    atrial = 1 + 0.12 * f
    h_la = 0.42 * anat.lv_length_mm * anat.la_scale**0.5
    r_la = 1.2 * anat.lv_radius_mm * anat.la_scale**0.5
    r_ra = 0.6 * ref * anat.ra_scale
    return dict(la_centre=(-0.03 * ref, -0.05 * ref, -0.45 * h_la),
                la_axes=(r_la * atrial, 0.92 * r_la * atrial, h_la * atrial),
                ra_centre=(ref * (1.35 + 0.3 * (anat.rv_scale - 1)), 0.05 * ref, -0.45 * h_la),
                ra_axes=(r_ra * atrial, 1.15 * r_ra * atrial, 0.9 * h_la * atrial),
                atrial_septum_a=_base_radius(lv["r_endo"]) + 0.5 * (lv["r_epi"] - lv["r_endo"]))


def _aorta(anat: Anatomy, s_base: float) -> dict:
    """Aortic root just outside the annulus on the anteroseptal side, heading up and out."""
    angle = math.radians(anat.aorta_angle_deg)
    rho = _base_radius(anat.lv_radius_mm) + anat.aorta_radius_mm + 1.5
    direction = np.array([0.3 * math.cos(angle), 0.3 * math.sin(angle), -1.0])
    direction /= np.linalg.norm(direction)
    return dict(aorta_start=(rho * math.cos(angle), rho * math.sin(angle), s_base),
                aorta_dir=tuple(map(float, direction)), aorta_length=70.0,
                aorta_radius=anat.aorta_radius_mm)


@functools.lru_cache(maxsize=1024)
def heart_state(anat: Anatomy, phase: float) -> HeartState:
    """The heart at ``phase`` (fraction of the R-R interval; 0 = end-diastole, R wave)."""
    f = systolic_fraction(phase, anat.es_fraction)
    lv = _lv_motion(anat, f)
    return HeartState(systole=f, **lv, **_rv_motion(anat, f, lv["s_base"]),
                      **_atria(anat, f, lv), **_aorta(anat, lv["s_base"]))


def end_systolic_phase(anat: Anatomy, num_phases: int) -> int:
    """Index of the frame (of ``num_phases`` evenly spaced) closest to end-systole."""
    values = [systolic_fraction(t / num_phases, anat.es_fraction) for t in range(num_phases)]
    return int(np.argmax(values))


# --- signed distances (mm, negative inside) -------------------------------------------------

def _ellipsoid_sd(da: np.ndarray, db: np.ndarray, ds: np.ndarray,
                  axes: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (exact zero set)."""
    ra, rb, rs = axes
    k0 = np.sqrt((da / ra) ** 2 + (db / rb) ** 2 + (ds / rs) ** 2)
    k1 = np.sqrt((da / ra**2) ** 2 + (db / rb**2) ** 2 + (ds / rs**2) ** 2)
    eps = 1e-6
    return (k0 - 1) * (k0 + eps) / (k1 + eps / min(axes))


def _territory_weight(anat: Anatomy, st: HeartState, cos_d: np.ndarray, s: np.ndarray,
                      ramp_deg: float = 20.0) -> np.ndarray:
    """1 inside the scar territory, falling smoothly to 0 outside (angle and long axis)."""
    assert anat.scar is not None  # called for subjects with a scar only
    centre, half, lo, hi = TERRITORIES[anat.scar.territory]
    c_in, c_out = math.cos(math.radians(half)), math.cos(math.radians(half + ramp_deg))
    ang = np.clip((cos_d - c_out) / (c_in - c_out), 0.0, 1.0)
    frac = (s - st.s_base) / max(anat.lv_length_mm - st.s_base, 1.0)
    ax = np.clip(np.minimum(frac - lo + 0.1, hi + 0.1 - frac) / 0.1, 0.0, 1.0)
    return ang * ax


@dataclass
class HeartDistances:
    """Signed distances (mm) of every structure at a set of points, plus the wall geometry."""

    lv_endo: np.ndarray
    lv_epi: np.ndarray
    rv_cavity: np.ndarray
    rv_outer: np.ndarray
    la: np.ndarray
    ra: np.ndarray
    atrial_walls: np.ndarray
    aorta: np.ndarray
    aorta_outer: np.ndarray
    epicardial_fat: np.ndarray
    scar: np.ndarray | None


def _angles(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radius from the LV axis and cos(theta) (theta from the septum)."""
    rho = np.sqrt(a * a + b * b) + np.float32(1e-4)
    return rho, a / rho


def lv_radii_at(anat: Anatomy, st: HeartState, a: np.ndarray, b: np.ndarray, s: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Angle-dependent spheroid radii (endocardial, epicardial) for points (a, b, s)."""
    rho, cos_t = _angles(a, b)
    r_endo = st.r_endo + np.zeros_like(rho)
    if anat.scar is not None and st.hypo_mm > 0:
        centre = math.radians(anat.scar.centre_deg)
        cos_d = (a * math.cos(centre) + b * math.sin(centre)) / rho
        r_endo = r_endo + st.hypo_mm * _territory_weight(anat, st, cos_d, s)
    r_epi = st.r_epi + st.septal_extra_mm * np.clip(cos_t, 0.0, None) ** 2
    return r_endo, r_epi


def heart_distances(anat: Anatomy, st: HeartState, a: np.ndarray, b: np.ndarray,
                    s: np.ndarray) -> HeartDistances:
    """Signed distances of all structures at heart-frame points (arrays of one shape)."""
    rho, _ = _angles(a, b)
    r_endo, r_epi = lv_radii_at(anat, st, a, b, s)
    z = s - st.lv_centre_s
    below_base = st.s_base - s  # > 0 above the base plane (atrial side)
    endo = np.maximum(_spheroid_sd(rho, z, r_endo, st.l_endo), below_base)
    epi_full = _spheroid_sd(rho, z, r_epi, st.l_epi)
    epi = np.maximum(epi_full, below_base)
    rv = _ellipsoid_sd(a - st.rv_centre[0], b, s - st.rv_centre[2], st.rv_axes)
    rv_cavity = np.maximum(np.maximum(rv, -epi_full), np.maximum(below_base, st.rv_guard_a - a))
    rv_outer = np.maximum(np.maximum(rv - RV_WALL_MM, below_base),
                          st.rv_guard_a - RV_WALL_MM - a)
    la, ra, walls = _atrial_distances(st, a, b, s)
    aorta = np.maximum(_tube_sd(st, a, b, s), -below_base)
    fat = np.maximum(np.minimum(epi_full, rv_outer) - EPICARDIAL_FAT_MM, below_base - 6.0)
    scar = _scar_sd(anat, st, a, b, s, rho, r_endo, r_epi, z, epi) if anat.scar else None
    return HeartDistances(endo, epi, rv_cavity, rv_outer, la, ra, walls, aorta,
                          aorta - AORTIC_WALL_MM, fat, scar)


def _atrial_distances(st: HeartState, a: np.ndarray, b: np.ndarray,
                      s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LA and RA cavities (beyond the base plane, either side of the atrial septum), walls."""
    above_base = s - st.s_base
    la_sd = _ellipsoid_sd(a - st.la_centre[0], b - st.la_centre[1], s - st.la_centre[2],
                          st.la_axes)
    ra_sd = _ellipsoid_sd(a - st.ra_centre[0], b - st.ra_centre[1], s - st.ra_centre[2],
                          st.ra_axes)
    sep = st.atrial_septum_a
    la = np.maximum(np.maximum(la_sd, above_base), a - (sep - 1.0))
    ra = np.maximum(np.maximum(ra_sd, above_base), (sep + 1.0) - a)
    walls = np.maximum(np.minimum(la_sd, ra_sd) - ATRIAL_WALL_MM, above_base)
    return la, ra, walls


def _spheroid_sd(rho: np.ndarray, z: np.ndarray, r: np.ndarray | float, length: float) -> np.ndarray:
    k0 = np.sqrt((rho / r) ** 2 + (z / length) ** 2)
    k1 = np.sqrt((rho / r**2) ** 2 + (z / length**2) ** 2)
    eps = 1e-6
    return (k0 - 1) * (k0 + eps) / (k1 + eps / np.minimum(r, length))


def _tube_sd(st: HeartState, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Distance to the aortic tube (a capsule from the aortic root along ``aorta_dir``)."""
    p0, u = st.aorta_start, st.aorta_dir
    da, db, ds = a - p0[0], b - p0[1], s - p0[2]
    t = np.clip(da * u[0] + db * u[1] + ds * u[2], 0.0, st.aorta_length)
    off = np.sqrt((da - t * u[0]) ** 2 + (db - t * u[1]) ** 2 + (ds - t * u[2]) ** 2)
    return off - st.aorta_radius


def _scar_sd(anat: Anatomy, st: HeartState, a: np.ndarray, b: np.ndarray, s: np.ndarray, rho: np.ndarray,
             r_endo: np.ndarray, r_epi: np.ndarray, z: np.ndarray, epi: np.ndarray) -> np.ndarray:
    """Scar: myocardium of the territory within ``transmurality`` of the wall from inside."""
    assert anat.scar is not None  # called for subjects with a scar only
    centre, half, lo, hi = TERRITORIES[anat.scar.territory]
    c0 = math.radians(centre)
    cos_d = (a * math.cos(c0) + b * math.sin(c0)) / rho
    angular = rho * (math.cos(math.radians(half)) - cos_d) / math.sin(math.radians(half))
    length = anat.lv_length_mm - st.s_base
    axial = np.maximum(st.s_base + lo * length - s, s - (st.s_base + hi * length))
    taper_endo = np.sqrt(np.clip(1 - (z / st.l_endo) ** 2, 0.0, None))
    taper_epi = np.sqrt(np.clip(1 - (z / st.l_epi) ** 2, 0.0, None))
    rho_endo, rho_epi = r_endo * taper_endo, r_epi * taper_epi
    transmural = (rho - rho_endo) - anat.scar.transmurality * (rho_epi - rho_endo)
    return np.maximum(np.maximum(epi, angular), np.maximum(axial, transmural))


def labels_from_distances(d: HeartDistances, with_scar: bool = False) -> np.ndarray:
    """Mask values at the points (later structures win): RA, LA, RV, LV myo, scar, LV blood."""
    labels = np.zeros(d.lv_endo.shape, dtype=np.uint8)
    labels[d.ra < 0] = RA_BLOOD
    labels[d.la < 0] = LA_BLOOD
    labels[d.aorta < 0] = BACKGROUND
    labels[d.rv_cavity < 0] = RV_BLOOD
    labels[d.lv_epi < 0] = LV_MYO
    if with_scar and d.scar is not None:
        labels[d.scar < 0] = SCAR
    labels[d.lv_endo < 0] = LV_BLOOD
    return labels


def heart_box(anat: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Heart-frame (a, b, s) bounds (mm) that hold the heart, atria and aortic root at any phase."""
    st = heart_state(anat, 0.0)
    ref = anat.epi_radius_mm * max(anat.septal_ratio, 1.0) + EPICARDIAL_FAT_MM + 6
    a_hi = max(st.rv_centre[0] + st.rv_axes[0], st.ra_centre[0] + st.ra_axes[0]) + 8
    b_hi = max(ref, st.rv_axes[1], st.la_axes[1] * 1.15, st.ra_axes[1],
               abs(st.aorta_start[1]) + anat.aorta_radius_mm + 25) + 6
    s_lo = min(st.la_centre[2] - st.la_axes[2] * 1.15, st.ra_centre[2] - st.ra_axes[2] * 1.15,
               -st.aorta_length) - 6
    s_hi = st.lv_centre_s + st.l_epi + 6
    a_lo = -max(ref, st.la_axes[0] * 1.15 + 4)
    return np.array([a_lo, -b_hi, s_lo]), np.array([a_hi, b_hi, s_hi])


# --- landmarks (heart frame) ----------------------------------------------------------------

def _epi_contour(anat: Anatomy, st: HeartState, s: float, theta: np.ndarray) -> np.ndarray:
    """Epicardial radius (mm) at angles ``theta`` on the short-axis plane at ``s``."""
    a, b = np.cos(theta), np.sin(theta)
    _, r_epi = lv_radii_at(anat, st, a, b, np.full_like(a, s))
    taper = 1 - ((s - st.lv_centre_s) / st.l_epi) ** 2
    return r_epi * math.sqrt(max(taper, 0.0))


def rv_insertion_points(anat: Anatomy, st: HeartState, s: float, samples: int = 1440
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """(anterior, inferior) RV insertion points as heart-frame (a, b, s), or None without RV.

    They are the two ends of the arc of the epicardial contour that the RV cavity touches: the
    junction of RV blood pool, LV myocardium and the RV free wall.
    """
    theta = np.linspace(0.0, 2 * np.pi, samples, endpoint=False) + np.pi  # start lateral
    rho = _epi_contour(anat, st, s, theta)
    if s < st.s_base or float(rho.max()) <= 0:
        return None
    probe = rho + 0.75
    a, b = probe * np.cos(theta), probe * np.sin(theta)
    inside = heart_distances(anat, st, a, b, np.full_like(a, s)).rv_cavity < 0
    if not inside.any():
        return None
    hits = np.flatnonzero(inside)
    ends = []
    for i in (hits[-1], hits[0]):  # larger angle (anterior) first
        ends.append(np.array([rho[i] * math.cos(theta[i]), rho[i] * math.sin(theta[i]), s]))
    return ends[0], ends[1]


def mitral_hinge_points(anat: Anatomy, st: HeartState, direction_deg: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Hinges of the mitral annulus in the long-axis plane through ``direction_deg`` and back.

    Each lies on the base plane at the endocardial radius: where LV blood pool, LV myocardium
    and LA meet.
    """
    points = []
    for angle in (math.radians(direction_deg), math.radians(direction_deg) + math.pi):
        a, b = np.array([math.cos(angle)]), np.array([math.sin(angle)])
        r_endo, _ = lv_radii_at(anat, st, a, b, np.array([st.s_base]))
        taper = 1 - ((st.s_base - st.lv_centre_s) / st.l_endo) ** 2
        rho = float(r_endo[0]) * math.sqrt(max(0.0, taper))
        points.append(np.array([rho * math.cos(angle), rho * math.sin(angle), st.s_base]))
    return points[0], points[1]


def lv_apex_point(st: HeartState) -> np.ndarray:
    """The epicardial apex: the apical tip of the LV myocardium, on the long axis."""
    return np.array([0.0, 0.0, st.lv_centre_s + st.l_epi])


def __getattr__(name: str) -> object:
    """Rendering moved to ``sim.render``; keep ``sim.phantom.render_sax`` & co. importable."""
    if name in ("Acquisition", "render_sax", "rician", "bias_field", "Contrast", "BSSFP_CINE"):
        from sim import render

        return getattr(render, name)
    raise AttributeError(f"module 'sim.phantom' has no attribute '{name}'")
