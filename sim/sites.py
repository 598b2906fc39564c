"""Simulated hospital sites: each one's scanner, protocol, patient mix and images.

Two users: the federation demo writes SAX cine frames straight into a node's store
(``site_spec`` / ``write_site_frames``), and the DICOM cohort (``sim.cohort``) uses the full
``SiteProfile``: vendor, field strength, resolution and field of view, slice thickness, cine
phases, noise, stored bits, series naming, export layout, disease mix and relative size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sim.phantom import sample_anatomy
from sim.render import Acquisition, render_sax

if TYPE_CHECKING:
    from client.store import LocalStore

# Scanner profiles sites draw from (vendor/field strength differences in contrast and noise).
SITE_PROFILES = (
    dict(intensity_scale=900.0, gamma=1.0, noise_sigma=0.025, bias_strength=0.2),
    dict(intensity_scale=2400.0, gamma=0.85, noise_sigma=0.04, bias_strength=0.35),
    dict(intensity_scale=450.0, gamma=1.15, noise_sigma=0.03, bias_strength=0.25),
    dict(intensity_scale=1500.0, gamma=0.95, noise_sigma=0.05, bias_strength=0.3),
)
DISEASE_MIXES = (
    {"NOR": 0.5, "DCM": 0.2, "HCM": 0.1, "MINF": 0.1, "ARV": 0.1},
    {"NOR": 0.2, "DCM": 0.1, "HCM": 0.4, "MINF": 0.2, "ARV": 0.1},
    {"NOR": 0.2, "DCM": 0.4, "HCM": 0.1, "MINF": 0.2, "ARV": 0.1},
    {"NOR": 0.3, "DCM": 0.1, "HCM": 0.1, "MINF": 0.2, "ARV": 0.3},
)


@dataclass(frozen=True)
class SiteSpec:
    index: int
    acquisition: Acquisition
    disease_mix: dict[str, float]


def site_spec(index: int, spacing_mm: float, crop_px: int) -> SiteSpec:
    profile = SITE_PROFILES[index % len(SITE_PROFILES)]
    acq = Acquisition(shape=(crop_px, crop_px), spacing_mm=spacing_mm, **profile)
    return SiteSpec(index=index, acquisition=acq, disease_mix=DISEASE_MIXES[index % len(DISEASE_MIXES)])


def write_site_frames(store_root: Path, spec: SiteSpec, num_images: int, seed: int,
                      slices: int = 4, phases: int = 4) -> LocalStore:
    """Render SAX cine frames for ``num_images`` / (slices*phases) subjects into a store."""
    from client.store import LocalStore, SeriesRecord, normalise_intensity  # torch: only here

    rng = np.random.default_rng([seed, spec.index])
    store = LocalStore.create(store_root, spec.acquisition.spacing_mm, spec.acquisition.shape[0])
    per_subject = slices * phases
    diseases, weights = zip(*spec.disease_mix.items())
    for subject in range(max(1, -(-num_images // per_subject))):
        key = f"sub{subject:03d}-sax-cine"
        if store.has(key):
            continue
        disease = str(rng.choice(diseases, p=np.array(weights) / sum(weights)))
        anat = sample_anatomy(rng, disease)
        frames = np.zeros((slices, phases, *spec.acquisition.shape), dtype=np.float32)
        for s, z in enumerate(np.linspace(0.0, 1.0, slices)):
            for t, phase in enumerate(np.arange(phases) / phases):
                image, _ = render_sax(anat, float(z), float(phase), spec.acquisition, rng)
                frames[s, t] = normalise_intensity(image)
        store.add_series(SeriesRecord(key=key, array="", shape=[], sequence="cine",
                                      view="sax", subject=f"sub{subject:03d}"), frames)
    return store


# --- DICOM cohort sites ----------------------------------------------------------------------

@dataclass(frozen=True)
class SiteProfile:
    """One hospital's scanner and habits, as the cohort writer uses them."""

    vendor: str  # DICOM Manufacturer
    model: str  # ManufacturerModelName
    field_strength_t: float
    pixel_spacing_mm: float
    matrix: tuple[int, int]  # rows, columns (FOV = matrix x spacing)
    slice_thickness_mm: float
    slice_gap_mm: float
    cine_phases: int
    intensity_scale: float  # bSSFP blood signal in real-world units
    gamma: float  # vendor intensity non-linearity
    noise_sigma: float  # Rician sigma relative to blood
    bias_strength: float  # coil-profile amplitude
    bits_stored: int
    rescale_slope: float  # magnitude images: stored = value / slope
    enhanced_multiframe: bool  # cine and LGE as Enhanced MR multi-frame instances
    uninformative_rate: float  # chance that a SeriesDescription says nothing
    layout: str  # "by_series" (study/series folders) or "hashed" (instances scattered)
    apex_first: bool  # instance numbers run apex -> base
    perfusion_dynamics: int
    subject_weight: float  # relative number of subjects
    disease_mix: dict[str, float]
    institution: str

    @property
    def spacing_between_slices_mm(self) -> float:
        return self.slice_thickness_mm + self.slice_gap_mm


SCANNERS = (
    SiteProfile("SIEMENS", "Aera", 1.5, 1.56, (160, 208), 8.0, 2.0, 25, 700.0, 1.0, 0.03, 0.25,
                12, 1.0, False, 0.1, "by_series", False, 30, 1.6, DISEASE_MIXES[0],
                "St Agnes SITE{i} Heart Centre"),
    SiteProfile("GE MEDICAL SYSTEMS", "SIGNA Premier", 3.0, 1.37, (176, 176), 8.0, 2.0, 20,
                3000.0, 0.85, 0.022, 0.35, 16, 1.0, False, 0.15, "hashed", True, 24, 0.6,
                DISEASE_MIXES[1], "Lakeside SITE{i} University Hospital"),
    SiteProfile("Philips", "Ingenia", 1.5, 1.82, (144, 144), 10.0, 0.0, 30, 1800.0, 1.15, 0.035,
                0.3, 12, 2.5, True, 0.35, "by_series", False, 30, 1.2, DISEASE_MIXES[2],
                "Royal SITE{i} Infirmary"),
    SiteProfile("SIEMENS", "MAGNETOM Prisma", 3.0, 2.0, (128, 160), 6.0, 4.0, 25, 1100.0, 0.95,
                0.028, 0.4, 12, 1.0, False, 0.0, "hashed", True, 24, 0.6, DISEASE_MIXES[3],
                "Northgate SITE{i} Cardiac Institute"),
)


def site_profile(index: int) -> SiteProfile:
    """Profile of site ``index``; beyond the four base scanners, variations of them."""
    base = SCANNERS[index % len(SCANNERS)]
    cycle = index // len(SCANNERS)
    if cycle == 0:
        return base
    rng = np.random.default_rng([index, 17])
    spacing = float(np.clip(base.pixel_spacing_mm * rng.uniform(0.9, 1.1), 1.2, 2.0))
    return replace(base, pixel_spacing_mm=round(spacing, 2),
                   noise_sigma=base.noise_sigma * float(rng.uniform(0.8, 1.3)),
                   subject_weight=float(rng.uniform(0.6, 1.4)),
                   disease_mix=DISEASE_MIXES[(index + cycle) % len(DISEASE_MIXES)])


def subjects_per_site(num_sites: int, mean_subjects: int, seed: int) -> list[int]:
    """Subjects at each site: exactly ``mean_subjects`` on average, at least 1 each, shared out
    by the sites' relative sizes (largest remainder; ties resolved by the seed)."""
    if num_sites < 1 or mean_subjects < 1:
        raise ValueError("need at least one site and one subject per site")
    weights = np.array([site_profile(i).subject_weight for i in range(num_sites)])
    extra = num_sites * (mean_subjects - 1)
    share = weights / weights.sum() * extra
    counts = np.floor(share).astype(int)
    jitter = np.random.default_rng([seed, 23]).uniform(0, 1e-6, num_sites)
    order = np.argsort(-(share - counts + jitter), kind="stable")
    counts[order[: extra - counts.sum()]] += 1
    return [int(c) + 1 for c in counts]
