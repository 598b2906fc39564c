"""Simulated hospital sites: each one's scanner, patient mix and images, written to its store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.store import LocalStore, SeriesRecord, normalise_intensity
from sim.phantom import Acquisition, render_sax, sample_anatomy

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
        for s, z in enumerate(np.linspace(0.05, 0.85, slices)):
            for t, phase in enumerate(np.arange(phases) / phases):
                image, _ = render_sax(anat, float(z), float(phase), spec.acquisition, rng)
                frames[s, t] = normalise_intensity(image)
        store.add_series(SeriesRecord(key=key, array="", shape=[], sequence="cine",
                                      view="sax", subject=f"sub{subject:03d}"), frames)
    return store
