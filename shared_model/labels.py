"""The label vocabulary every part of FedCMR shares: mask values, landmarks, class names.

Masks in the store use one global set of values, whatever the sequence or view; a task picks the
structures it segments. Scar (LGE) is myocardium too: a pixel labelled ``scar`` counts as
myocardium for a task that segments the myocardium.
"""

from __future__ import annotations

# Mask values (uint8). 0 is background.
MASK_VALUES: dict[str, int] = {
    "lv_blood": 1,  # LV blood pool (cavity)
    "lv_myo": 2,  # LV myocardium
    "rv_blood": 3,  # RV blood pool
    "la_blood": 4,  # left atrium
    "ra_blood": 5,  # right atrium
    "scar": 6,  # late-enhancing (infarcted) myocardium
}

# Acquisition classes (task 1) and cine views (task 2); "unknown" where headers do not tell.
SEQUENCES: tuple[str, ...] = ("cine", "lge", "t1_map", "t2_map", "t2w", "perfusion", "localizer")
VIEWS: tuple[str, ...] = ("sax", "2ch", "3ch", "4ch")
UNKNOWN = "unknown"

# Landmarks (task 7), as (row, col) in pixels of the image they belong to.
SAX_LANDMARKS: tuple[str, ...] = ("rv_insertion_anterior", "rv_insertion_inferior")
LAX_LANDMARKS: tuple[str, ...] = ("mitral_hinge_1", "mitral_hinge_2", "lv_apex")
LANDMARKS: tuple[str, ...] = SAX_LANDMARKS + LAX_LANDMARKS

# Study-level cardiac disease classes (task 9, ACDC's five) and LGE pathology (task 8).
DISEASES: tuple[str, ...] = ("NOR", "DCM", "HCM", "MINF", "ARV")
LGE_PATHOLOGY: tuple[str, ...] = ("no_scar", "scar")


def frame_key(slice_index: int, phase_index: int) -> str:
    """How a frame of a (slices, phases, H, W) series is named in manifests: ``"s,t"``."""
    return f"{slice_index},{phase_index}"


def parse_frame_key(key: str) -> tuple[int, int]:
    s, t = key.split(",")
    return int(s), int(t)
