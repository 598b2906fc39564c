"""Tissue contrast of each CMR sequence at 1.5 T and 3 T.

Magnitude sequences give relative signal (blood in bSSFP ~ 1); quantitative maps give the
tissue's relaxation time in ms, from published native values (MOLLI T1: myocardium ~1000 ms at
1.5 T and ~1200 ms at 3 T, blood ~1600 / ~1900 ms; T2: myocardium ~47 / ~44 ms, blood ~220 /
~180 ms). Perfusion is a time series: a gamma-variate bolus reaches the right heart, then the left
heart, then the myocardium; an infarct stays dark (a perfusion defect).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from shared_model.labels import SEQUENCES

TISSUES = ("air", "fat", "muscle", "soft", "lung", "liver", "marrow", "csf", "blood_left",
           "blood_right", "myocardium", "scar")
TISSUE_INDEX = {name: i for i, name in enumerate(TISSUES)}
MAP_SEQUENCES = ("t1_map", "t2_map")


@dataclass(frozen=True)
class Contrast:
    """Signal of each tissue in one acquisition (relative units, or ms for maps)."""

    fat: float
    muscle: float
    soft: float  # mediastinum, abdominal organs other than the liver
    lung: float
    liver: float
    marrow: float
    csf: float
    blood_left: float  # LV, LA, aorta
    blood_right: float  # RV, RA
    myocardium: float
    scar: float
    air: float = 0.0

    def vector(self) -> np.ndarray:
        """Values in ``TISSUES`` order, float32."""
        by_name = {f.name: getattr(self, f.name) for f in fields(self)}
        return np.array([by_name[name] for name in TISSUES], dtype=np.float32)


BSSFP_CINE = Contrast(fat=0.85, muscle=0.28, soft=0.55, lung=0.06, liver=0.3, marrow=0.5, csf=1.05,
                      blood_left=1.0, blood_right=1.0, myocardium=0.27, scar=0.29)
LGE = Contrast(fat=0.5, muscle=0.12, soft=0.25, lung=0.04, liver=0.3, marrow=0.4, csf=0.15,
               blood_left=0.5, blood_right=0.5, myocardium=0.02, scar=1.0)
T2W_STIR = Contrast(fat=0.1, muscle=0.4, soft=0.6, lung=0.05, liver=0.45, marrow=0.25, csf=1.6,
                    blood_left=0.06, blood_right=0.06, myocardium=0.6, scar=0.95)
PERFUSION_BASELINE = Contrast(fat=0.5, muscle=0.22, soft=0.3, lung=0.06, liver=0.3, marrow=0.45,
                              csf=0.08, blood_left=0.18, blood_right=0.18, myocardium=0.15,
                              scar=0.15)
T1_MS = {1.5: Contrast(fat=260, muscle=1010, soft=1100, lung=1250, liver=590, marrow=600, csf=3500,
                       blood_left=1600, blood_right=1600, myocardium=1000, scar=1350),
         3.0: Contrast(fat=380, muscle=1250, soft=1350, lung=1400, liver=810, marrow=750, csf=4000,
                       blood_left=1900, blood_right=1900, myocardium=1200, scar=1550)}
T2_MS = {1.5: Contrast(fat=65, muscle=34, soft=45, lung=40, liver=35, marrow=55, csf=300,
                       blood_left=220, blood_right=220, myocardium=47, scar=58),
         3.0: Contrast(fat=60, muscle=31, soft=42, lung=36, liver=30, marrow=50, csf=300,
                       blood_left=180, blood_right=180, myocardium=44, scar=54)}
MAP_NOISE_MS = {"t1_map": 25.0, "t2_map": 2.0}


def gamma_variate(t: np.ndarray, arrival: float, peak_after: float = 3.0) -> np.ndarray:
    """Bolus shape, 0 before ``arrival`` and 1 at ``arrival + peak_after`` (units of dynamics)."""
    x = np.clip((t - arrival) / peak_after, 0.0, None)
    return x**2 * np.exp(2 * (1 - x))


def perfusion_contrasts(num_dynamics: int, field_t: float) -> np.ndarray:
    """(dynamics, tissues) signal of a first-pass perfusion series, one dynamic per heartbeat."""
    t = np.arange(num_dynamics, dtype=np.float32)
    base = PERFUSION_BASELINE.vector()
    gain = 1.0 if field_t < 2 else 1.2
    curves = np.repeat(base[None], num_dynamics, axis=0)
    arrival = max(1.0, 0.12 * num_dynamics)
    step = max(1.0, 0.12 * num_dynamics)
    curves[:, TISSUE_INDEX["blood_right"]] += 1.1 * gain * gamma_variate(t, arrival)
    left = 0.9 * gain * gamma_variate(t, arrival + step)
    curves[:, TISSUE_INDEX["blood_left"]] += left
    myocardium = gamma_variate(t, arrival + 1.5 * step, 5.0)
    curves[:, TISSUE_INDEX["myocardium"]] += 0.3 * gain * myocardium
    curves[:, TISSUE_INDEX["scar"]] += 0.05 * gain * gamma_variate(t, arrival + 2.5 * step, 6.0)
    curves[:, TISSUE_INDEX["liver"]] += 0.15 * gain * gamma_variate(t, arrival + 2 * step, 8.0)
    return curves.astype(np.float32)


def contrast_for(sequence: str, field_t: float, jitter: np.ndarray | None = None) -> np.ndarray:
    """(1, tissues) signal of a single-contrast sequence at ``field_t``.

    ``jitter`` (one factor per tissue, about 1) stands for a vendor's own protocol; maps are
    physical values and get none.
    """
    if sequence not in SEQUENCES or sequence == "perfusion":
        raise ValueError(f"no single contrast for sequence '{sequence}'")
    field = 1.5 if field_t < 2 else 3.0
    if sequence in MAP_SEQUENCES:
        table = T1_MS if sequence == "t1_map" else T2_MS
        return table[field].vector()[None]
    base = {"cine": BSSFP_CINE, "lge": LGE, "t2w": T2W_STIR}[sequence]
    if sequence == "cine" and field == 3.0:
        base = replace(base, myocardium=0.24, fat=0.8, liver=0.27)
    values = base.vector()
    if jitter is not None:
        values = values * jitter.astype(np.float32)
    return values[None]


__all__ = ["Contrast", "TISSUES", "TISSUE_INDEX", "BSSFP_CINE", "contrast_for",
           "perfusion_contrasts", "MAP_SEQUENCES", "MAP_NOISE_MS"]
