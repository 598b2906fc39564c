"""Small SeriesData with exact, hand-made labels for task tests (no phantom, no store)."""

import numpy as np

from shared_model.labels import MASK_VALUES
from shared_model.tasks.base import SeriesData


def disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[:size, :size]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def sax_series(key: str, subject: str, size: int = 32, slices: int = 3, phases: int = 4,
               disease: str = "NOR", seed: int = 0) -> SeriesData:
    """A cine SAX stack: bright LV pool, dark ring of myocardium, bright RV beside it."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.05, (slices, phases, size, size)).astype(np.float32)
    mask = np.zeros(images.shape, dtype=np.uint8)
    c = size / 2
    for s in range(slices):
        for t in range(phases):
            r = size * (0.18 - 0.04 * (t % 2)) * (1 - 0.2 * s / slices)
            myo, pool = disc(size, (c, c), r + 3), disc(size, (c, c), r)
            rv = disc(size, (c, c - r - 6), r * 0.8) & ~myo
            mask[s, t][myo] = MASK_VALUES["lv_myo"]
            mask[s, t][pool] = MASK_VALUES["lv_blood"]
            mask[s, t][rv] = MASK_VALUES["rv_blood"]
            images[s, t][pool | rv] += 0.6
            images[s, t][myo & ~pool] -= 0.15
    labeled = [(s, t) for s in range(slices) for t in (0, 1)]
    landmarks = {(s, 0): {"rv_insertion_anterior": (c - 8.25, c - 4.5),
                          "rv_insertion_inferior": (c + 8.0, c - 4.75)} for s in range(slices)}
    return SeriesData(key=key, subject=subject, images=images, spacing_mm=1.5, sequence="cine",
                      view="sax", mask=mask, labeled_frames=labeled, landmarks=landmarks,
                      subject_labels={"disease": disease})


def lge_series(key: str, subject: str, scar: bool, size: int = 32, slices: int = 3) -> SeriesData:
    images = np.full((slices, 1, size, size), 0.2, dtype=np.float32)
    mask = np.zeros(images.shape, dtype=np.uint8)
    c = size / 2
    for s in range(slices):
        myo, pool = disc(size, (c, c), 9), disc(size, (c, c), 6)
        mask[s, 0][myo] = MASK_VALUES["lv_myo"]
        mask[s, 0][pool] = MASK_VALUES["lv_blood"]
        if scar:
            patch = myo & ~pool & (np.mgrid[:size, :size][0] < c)
            mask[s, 0][patch] = MASK_VALUES["scar"]
            images[s, 0][patch] = 0.9
    return SeriesData(key=key, subject=subject, images=images, spacing_mm=1.5, sequence="lge",
                      view="sax", mask=mask, labeled_frames=[(s, 0) for s in range(slices)],
                      classes={"lge_pathology": "scar" if scar else "no_scar"})


def run_killed_on_loss_call(monkeypatch, call: int, run) -> None:  # noqa: ANN001 - pytest's fixture, a callable
    """``run()`` with fine-tuning's loss raising KeyboardInterrupt on its ``call``-th call (a node
    stopped mid-session); the loss is restored afterwards."""
    import pytest

    import shared_model.finetune as finetune_module

    real_loss = finetune_module.task_loss
    calls = {"n": 0}

    def dying_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("node stopped")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "task_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(finetune_module, "task_loss", real_loss)
