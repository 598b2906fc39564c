"""The map from scanner pixels to store pixels: images, masks and landmarks agree."""

from __future__ import annotations

import numpy as np
import pytest

from client.intake.geometry import grid_indices, point_to_store, resample_image, resample_mask
from client.store import intensity_window, normalise_intensity


@pytest.mark.parametrize("spacing", [(0.7, 0.7), (1.367, 1.367), (2.0, 1.6)])
def test_resampling_keeps_physical_size_and_position(spacing):
    # Prepare: a 20 mm radius disc, 10 mm off the image centre, at the scanner's spacing
    rows, cols = 256, 224
    centre_px = ((rows - 1) / 2 + 10 / spacing[0], (cols - 1) / 2 - 10 / spacing[1])
    radius_mm = 20.0
    rr, cc = np.mgrid[0:rows, 0:cols]
    image = (((rr - centre_px[0]) * spacing[0]) ** 2 + ((cc - centre_px[1]) * spacing[1]) ** 2
             <= radius_mm ** 2).astype(np.float32)

    # Execute
    store = resample_image(image, spacing, 96, 1.0)
    mask = resample_mask(image.astype(np.uint8), spacing, 96, 1.0)
    centre_store = point_to_store(*centre_px, (rows, cols), spacing, 96, 1.0)

    # Assert: area (mm²) and centre survive, for images, masks and points alike
    assert store.sum() == pytest.approx(np.pi * radius_mm ** 2, rel=0.03)
    assert mask.sum() == pytest.approx(np.pi * radius_mm ** 2, rel=0.05)
    weights = np.argwhere(mask > 0).mean(axis=0)
    assert np.allclose(weights, centre_store, atol=0.5)
    assert np.allclose(centre_store, (47.5 + 10, 47.5 - 10), atol=1e-9)


def test_crop_pads_with_zeros_outside_the_original_image():
    # Prepare: a small 40 x 40 mm image in a 96 mm store crop
    image = np.ones((40, 40), dtype=np.float32)

    # Execute
    out = resample_image(image, (1.0, 1.0), 96, 1.0)

    # Assert
    assert out[48, 48] == pytest.approx(1.0) and out[0, 0] == 0.0
    assert (out > 0.5).sum() == pytest.approx(40 * 40, rel=0.06)


def test_grid_orders_by_position_then_trigger_time():
    # Prepare: frames given in a scrambled order
    positions = np.array([20.0, 0.0, 10.0, 0.0, 20.0, 10.0])
    keys = [(300.0, 0.0), (300.0, 0.0), (40.0, 0.0), (40.0, 0.0), (40.0, 0.0), (300.0, 0.0)]

    # Execute
    slices, phases = grid_indices(positions, keys)

    # Assert
    assert slices.tolist() == [2, 0, 1, 0, 2, 1]
    assert phases.tolist() == [1, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("shape", [(1,), (7,), (64, 64), (600, 600)])
def test_intensity_window_is_numpy_percentile(shape):
    # Prepare
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    # Execute
    lo, hi = intensity_window(image)

    # Assert: the store's fast path gives np.percentile's numbers
    np.testing.assert_allclose((lo, hi), np.percentile(image, [1, 99]), rtol=1e-6, atol=1e-6)
    if image.size > 1:
        scaled = normalise_intensity(image)
        assert np.percentile(scaled, 1) == pytest.approx(0, abs=1e-5)
        assert np.percentile(scaled, 99) == pytest.approx(1, abs=1e-5)
