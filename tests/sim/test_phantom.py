"""The phantom's labels agree with each other: masks, landmarks, motion and disease classes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_model.labels import MASK_VALUES
from sim.phantom import (TERRITORIES, end_systolic_phase, heart_frame, heart_state, lv_apex_point,
                         mitral_hinge_points, rv_insertion_points, sample_anatomy)
from sim.planes import Plane, lax_direction_deg, lax_plane, sax_positions, sax_stack
from sim.render import Acquisition, PlaneRenderer, map_image, plane_labels, render_sax
from sim.sequences import contrast_for

LV, MYO, RV = MASK_VALUES["lv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["rv_blood"]
LA, RA, SCAR = MASK_VALUES["la_blood"], MASK_VALUES["ra_blood"], MASK_VALUES["scar"]
SPACING = (1.25, 1.25)


def _anatomy(disease: str, seed: int = 0):
    return sample_anatomy(np.random.default_rng([seed, len(disease)]), disease)


def _stack(anat, spacing_between: float = 5.0, shape=(112, 112)) -> tuple[list[Plane], np.ndarray]:
    positions = sax_positions(anat, spacing_between)
    planes = sax_stack(anat, *shape, SPACING, spacing_between, np.random.default_rng(0),
                       positions=positions)
    return planes, positions


def _near(labels: np.ndarray, row: float, col: float, radius: float = 2.0) -> set[int]:
    """Label values within ``radius`` pixels of a (row, col) point."""
    rr, cc = np.mgrid[: labels.shape[0], : labels.shape[1]]
    return set(np.unique(labels[(rr - row) ** 2 + (cc - col) ** 2 <= radius**2]).tolist())


def _volumes_ml(anat, phase: float, spacing_between: float = 5.0) -> dict[int, float]:
    """Volumes from masks of a stack covering the whole ventricle (ED base to apex)."""
    st = heart_state(anat, 0.0)
    positions = np.arange(spacing_between / 2, st.lv_centre_s + st.l_epi + 1, spacing_between)
    planes = sax_stack(anat, 112, 112, SPACING, spacing_between, np.random.default_rng(0),
                       positions=positions)
    voxel_ml = SPACING[0] * SPACING[1] * spacing_between / 1000
    counts = np.zeros(7)
    for plane in planes:
        counts += np.bincount(plane_labels(anat, plane, phase).ravel(), minlength=7)[:7]
    return {value: counts[value] * voxel_ml for value in (LV, MYO, RV)}


def _mid_wall_mm(anat) -> float:
    """Mean ED wall thickness on the mid-ventricular slice, from mask areas (annulus)."""
    planes, _ = _stack(anat)
    labels = plane_labels(anat, planes[len(planes) // 2], 0.0)
    pixel = SPACING[0] * SPACING[1]
    blood, myo = (labels == LV).sum() * pixel, (labels == MYO).sum() * pixel
    return math.sqrt((blood + myo) / math.pi) - math.sqrt(blood / math.pi)


def test_rv_insertion_points_sit_where_rv_blood_meets_lv_myocardium() -> None:
    # Prepare
    anat = _anatomy("NOR")
    planes, positions = _stack(anat, 10.0)
    frame = heart_frame(anat)
    checked = 0
    # Execute / Assert
    for phase in (0.0, anat.es_fraction):
        st = heart_state(anat, phase)
        for plane, s in zip(planes, positions):
            labels = plane_labels(anat, plane, phase)
            points = rv_insertion_points(anat, st, float(s))
            assert (points is None) == (RV not in labels), f"RV presence at s={s:.0f} mm"
            if points is None:
                continue
            anterior, inferior = points
            assert anterior[1] > 0 > inferior[1]  # heart-frame b: anterior wall positive
            for point in points:
                row, col = plane.lps_to_pixel(frame.to_lps(*point))
                assert {MYO, RV} <= _near(labels, row, col), f"landmark off the junction at s={s}"
                checked += 1
    assert checked >= 8


@pytest.mark.parametrize("view", ["2ch", "3ch", "4ch"])
def test_lax_landmarks_match_apex_and_mitral_annulus(view: str) -> None:
    # Prepare
    anat = _anatomy("NOR", seed=3)
    plane = lax_plane(anat, view, 160, 160, SPACING, np.random.default_rng(1))
    frame = heart_frame(anat)
    _, _, s = plane.heart_grid(frame)
    for phase in (0.0, anat.es_fraction):
        st = heart_state(anat, phase)
        labels = plane_labels(anat, plane, phase)
        # Execute
        apex = plane.lps_to_pixel(frame.to_lps(*lv_apex_point(st)))
        hinges = [plane.lps_to_pixel(frame.to_lps(*p))
                  for p in mitral_hinge_points(anat, st, lax_direction_deg(anat, view))]
        # Assert: the apex is the apical tip of the myocardium in this image
        apex_s = float(frame.from_lps(plane.pixel_to_lps(*apex))[2])
        assert abs(apex_s - float(s[labels == MYO].max())) <= 1.5 * SPACING[0]
        assert MYO in _near(labels, *apex)
        for row, col in hinges:
            near = _near(labels, row, col)
            assert LA in near and LV in near and MYO in near, f"{view} hinge neighbours {near}"
        assert abs(hinges[0][1] - hinges[1][1]) > 10  # the two hinges are apart across the LV
    expected = {"2ch": {0, LV, MYO, LA}, "3ch": {0, LV, MYO, LA, RV},
                "4ch": {0, LV, MYO, LA, RA, RV}}[view]
    assert set(np.unique(plane_labels(anat, plane, 0.0)).tolist()) == expected


def test_systole_shrinks_the_blood_pool_and_thickens_the_wall() -> None:
    # Prepare
    anat = _anatomy("NOR", seed=1)
    planes, _ = _stack(anat, 10.0)
    es = anat.es_fraction
    # Execute
    ed_labels = [plane_labels(anat, p, 0.0) for p in planes]
    es_labels = [plane_labels(anat, p, es) for p in planes]
    # Assert: per slice, less blood at end-systole, about the same myocardial area, thicker wall
    for ed, es_ in zip(ed_labels, es_labels):
        assert (es_ == LV).sum() < (ed == LV).sum()
        assert 0.75 < (es_ == MYO).sum() / (ed == MYO).sum() < 1.35
    ed_ml, es_ml = _volumes_ml(anat, 0.0, 2.0), _volumes_ml(anat, es, 2.0)
    assert abs(es_ml[MYO] / ed_ml[MYO] - 1) < 0.08  # myocardial volume is conserved
    ef = 1 - es_ml[LV] / ed_ml[LV]
    assert 0.5 < ef < 0.75


def test_rv_vanishes_toward_the_apex() -> None:
    # Prepare
    anat = _anatomy("NOR", seed=2)
    planes, _ = _stack(anat, 8.0)
    # Execute
    rv_area = [int((plane_labels(anat, p, 0.0) == RV).sum()) for p in planes]
    lv_area = [int((plane_labels(anat, p, 0.0) == MYO).sum()) for p in planes]
    # Assert: RV at the base, none at the apex, shrinking on the way; LV myocardium throughout
    assert rv_area[0] > 200 and rv_area[-1] == 0
    last = max(i for i, a in enumerate(rv_area) if a > 0)
    assert all(a > 0 for a in rv_area[: last + 1]) and last < len(rv_area) - 1
    assert rv_area[last] < rv_area[len(rv_area) // 3]
    assert all(a > 0 for a in lv_area)


def test_end_systolic_phase_is_the_smallest_cavity() -> None:
    anat = _anatomy("NOR", seed=4)
    plane = _stack(anat, 10.0)[0][2]
    areas = [(plane_labels(anat, plane, t / 20) == LV).sum() for t in range(20)]
    assert end_systolic_phase(anat, 20) == int(np.argmin(areas))


def test_disease_classes_match_the_anatomy_in_the_masks() -> None:
    # Prepare / Execute: volumes and EF from SAX masks, wall from the mid slice
    stats = {}
    for disease in ("NOR", "DCM", "HCM", "ARV"):
        anat = _anatomy(disease)
        ed, es = _volumes_ml(anat, 0.0), _volumes_ml(anat, anat.es_fraction)
        stats[disease] = dict(edv=ed[LV], ef=1 - es[LV] / ed[LV], rv=ed[RV],
                              wall=_mid_wall_mm(anat))
    nor, dcm, hcm, arv = (stats[d] for d in ("NOR", "DCM", "HCM", "ARV"))
    # Assert
    assert dcm["edv"] > 1.5 * nor["edv"] and dcm["ef"] < 0.4 < nor["ef"]
    assert dcm["wall"] < nor["wall"]
    assert hcm["wall"] > 1.4 * nor["wall"] and hcm["ef"] > nor["ef"] - 0.05
    assert arv["rv"] / arv["edv"] > 1.5 * nor["rv"] / nor["edv"]
    assert 90 < nor["edv"] < 220


def _sector_shortening(anat, plane: Plane, centre_deg: float) -> tuple[float, float]:
    """Endocardial radial shortening (ED->ES) inside a territory and opposite to it."""
    a, b, _ = plane.heart_grid(heart_frame(anat))
    angle = np.degrees(np.arctan2(b, a))
    out = []
    for centre in (centre_deg, centre_deg + 180):
        sector = np.abs((angle - centre + 180) % 360 - 180) < 20
        radius = [np.hypot(a, b)[sector & (plane_labels(anat, plane, ph) == LV)].max()
                  for ph in (0.0, anat.es_fraction)]
        out.append(1 - radius[1] / radius[0])
    return out[0], out[1]


def test_infarct_has_scar_in_its_territory_and_moves_less_there() -> None:
    # Prepare
    anat = _anatomy("MINF", seed=5)
    centre, half, lo, hi = TERRITORIES[anat.scar.territory]
    planes, positions = _stack(anat, 6.0)
    frac = positions / anat.lv_length_mm
    k = int(np.argmin(np.abs(frac - (max(lo, 0.1) + min(hi, 0.8)) / 2)))
    # Execute
    lge = plane_labels(anat, planes[k], 0.72, scar_label=True)
    cine = plane_labels(anat, planes[k], 0.72)
    a, b, _ = planes[k].heart_grid(heart_frame(anat))
    scar_angle = np.degrees(np.arctan2(b, a))[lge == SCAR]
    territory, remote = _sector_shortening(anat, planes[k], centre)
    # Assert
    assert (lge == SCAR).sum() > 20 and SCAR not in cine  # scar only in LGE masks
    assert np.all(np.abs((scar_angle - centre + 180) % 360 - 180) <= half + 3)
    assert ((lge == MYO) | (lge == SCAR)).sum() == (cine == MYO).sum()  # scar is myocardium
    assert territory < 0.5 * remote
    normal = _anatomy("NOR")
    assert SCAR not in plane_labels(normal, _stack(normal)[0][3], 0.72, scar_label=True)


def _map_values(field_t: float, sequence: str) -> tuple[float, float]:
    anat = _anatomy("NOR", seed=6)
    plane = _stack(anat, 10.0)[0][3]
    renderer = PlaneRenderer(anat, plane, contrast_for(sequence, field_t))
    signal, labels = renderer.frame(0.72)
    image = map_image(signal[0], renderer.gain(0.0, 0.0, 1.0) - 1, 20.0 if sequence == "t1_map"
                      else 2.0, np.random.default_rng(0))
    return float(np.median(image[labels == MYO])), float(np.median(image[labels == LV]))


@pytest.mark.parametrize("sequence, field_t, myo_ms, blood_ms", [
    ("t1_map", 1.5, (950, 1050), (1500, 1700)), ("t1_map", 3.0, (1150, 1250), (1800, 2000)),
    ("t2_map", 1.5, (43, 52), (180, 260)), ("t2_map", 3.0, (40, 49), (150, 220))])
def test_maps_hold_realistic_relaxation_times_in_ms(sequence, field_t, myo_ms, blood_ms) -> None:
    myo, blood = _map_values(field_t, sequence)
    assert myo_ms[0] < myo < myo_ms[1] and blood_ms[0] < blood < blood_ms[1]


def test_lge_nulls_myocardium_and_lights_up_scar() -> None:
    # Prepare
    anat = _anatomy("MINF", seed=5)
    plane = _stack(anat, 6.0)[0][6]
    renderer = PlaneRenderer(anat, plane, contrast_for("lge", 1.5))
    # Execute
    signal, labels = renderer.frame(0.72, scar_label=True)
    # Assert: interior pixels (no partial volume) follow the LGE contrast
    myo, blood, scar = (float(np.median(signal[0][labels == v])) for v in (MYO, LV, SCAR))
    assert myo < 0.15 * blood and scar > 1.5 * blood


def test_borders_have_partial_volume_and_backgrounds_are_not_flat() -> None:
    # Prepare
    anat = _anatomy("NOR")
    renderer = PlaneRenderer(anat, _stack(anat, 10.0)[0][3], contrast_for("cine", 1.5))
    # Execute
    signal, labels = renderer.frame(0.0)
    image = signal[0]
    # Assert: between myocardium (0.27) and blood (1.0) there are mixed pixels; the chest has
    # many tissues, not one level
    border = (labels == LV) & (np.roll(labels, 1, axis=0) == MYO)
    assert np.any((image[border] > 0.35) & (image[border] < 0.95))
    background = image[labels == 0]
    assert len(np.unique(np.round(background, 2))) > 20 and background.std() > 0.1


def test_render_sax_keeps_the_store_writer_working() -> None:
    # Prepare
    anat = _anatomy("NOR")
    acq = Acquisition(shape=(96, 96), spacing_mm=1.6, intensity_scale=900.0)
    # Execute
    image, labels = render_sax(anat, 0.3, 0.0, acq, np.random.default_rng(0))
    # Assert
    assert image.shape == labels.shape == (96, 96) and image.dtype == np.float32
    assert {LV, MYO, RV} <= set(np.unique(labels).tolist())
    assert image[labels == LV].mean() > 2 * image[labels == MYO].mean()


def test_sample_anatomy_rejects_an_unknown_disease() -> None:
    with pytest.raises(ValueError, match="unknown disease"):
        sample_anatomy(np.random.default_rng(0), "FLU")


def test_same_seed_same_anatomy() -> None:
    assert _anatomy("DCM", 9) == _anatomy("DCM", 9) != _anatomy("DCM", 10)
