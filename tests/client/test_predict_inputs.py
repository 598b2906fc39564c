"""Prediction on raw inputs: heart found before cropping, masks in the input's own geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from client.inference import ModelGrid, Segmenter, convex_hull, locate_heart, segment_stack
from client.predict_inputs import nifti_affine, predict_dicom, predict_nnunet, read_dicom_stacks, stack_grid
from shared_model.tasks import get_task
from tests.client.dicom_factory import write_cine_series

GRID = ModelGrid(size=32, spacing_mm=2.0)  # a 64 mm window: smaller than the test images


class BrightIsBloodPool(torch.nn.Module):
    """Stands in for a trained model: pixels brighter than half the image's brightest are
    class 1 (whatever the window's normalisation made of them)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.full((images.shape[0], 4, *images.shape[-2:]), -10.0)
        logits[:, 0] = 0.0
        peak = images.flatten(1).amax(dim=1)[:, None, None]
        logits[:, 1] = 40.0 * (images[:, 0] / peak - 0.5)
        return logits


def _segmenter() -> Segmenter:
    return Segmenter(BrightIsBloodPool(), GRID, torch.device("cpu"))


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("spacing, centre, radius", [
    ((1.0, 1.0), (60.0, 60.0), 8.0),  # centred
    ((1.0, 1.0), (25.0, 150.0), 8.0),  # shifted far off the centre of a wide field of view
    ((0.5, 0.5), (150.0, 60.0), 16.0),  # zoomed in: twice the pixels, off-centre
    ((1.4, 0.9), (40.0, 120.0), 7.0),  # anisotropic pixels
])
def test_heart_is_found_and_the_mask_lands_on_it(spacing, centre, radius) -> None:
    # Prepare: a frame bigger than the model's window, a bright disc somewhere in it
    shape = (180, 200)
    rng = np.random.default_rng(0)
    truth = _disc(shape, centre, radius)
    frame = rng.normal(100, 5, size=shape).astype(np.float32)
    frame[truth] += 800

    # Execute
    labels = segment_stack(_segmenter(), [frame, frame.copy()], spacing)

    # Assert
    assert labels.shape == (2, *shape)
    assert _dice(labels[0] == 1, truth) > 0.9


def test_a_bigger_bright_region_at_the_edge_does_not_pull_the_window_off_the_heart() -> None:
    # Prepare: the heart near the image centre and a larger bright region (another organ the
    # model was never trained to reject) in a corner of a wide field of view
    shape = (180, 200)
    heart = _disc(shape, (95.0, 105.0), 8.0)
    frame = np.random.default_rng(0).normal(100, 5, size=shape).astype(np.float32)
    frame[heart] += 800
    frame[_disc(shape, (25.0, 175.0), 14.0)] += 800

    # Execute
    centre = locate_heart(_segmenter(), [frame], (1.0, 1.0))
    labels = segment_stack(_segmenter(), [frame], (1.0, 1.0))

    # Assert: within a quarter window of the image centre the window stays where the store cuts it
    assert centre == ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    assert _dice(labels[0] == 1, heart) > 0.9


def test_convex_hull_fills_a_notch_and_leaves_degenerate_masks() -> None:
    crescent = _disc((40, 40), (20.0, 20.0), 10.0) & ~_disc((40, 40), (20.0, 27.0), 6.0)
    hull = convex_hull(crescent)
    assert (hull >= crescent).all() and hull.sum() > crescent.sum() + 30
    assert hull[20, 24] and not crescent[20, 24]  # the notch, inside the hull
    assert not hull[0, 0] and not hull[20, 35]  # outside the disc stays outside
    line = np.zeros((10, 10), dtype=bool)
    line[2, 1:8] = True
    assert (convex_hull(line) == line).all()
    assert (convex_hull(np.zeros((5, 5), dtype=bool)) == 0).all()


def test_a_convex_class_is_drawn_around_what_the_model_cut_out_of_it() -> None:
    # Prepare: a bright cavity with a dark papillary muscle at its edge, which the stand-in
    # model (bright = class 1) leaves out
    shape = (120, 120)
    cavity = _disc(shape, (60.0, 60.0), 12.0)
    muscle = _disc(shape, (60.0, 70.0), 4.0) & cavity
    frame = np.random.default_rng(0).normal(100, 5, size=shape).astype(np.float32)
    frame[cavity & ~muscle] += 800

    # Execute
    plain = segment_stack(_segmenter(), [frame], (1.0, 1.0))[0] == 1
    cavity_task = Segmenter(BrightIsBloodPool(), GRID, torch.device("cpu"),
                            convex_classes=get_task("sax_seg").convex_classes)
    convex = segment_stack(cavity_task, [frame], (1.0, 1.0))[0] == 1

    # Assert: sax_seg's LV blood pool (class 1) is its region's convex hull
    assert get_task("sax_seg").convex_classes == (1,)
    assert _dice(convex, cavity) > _dice(plain, cavity) + 0.02 and _dice(convex, cavity) > 0.95


def test_two_cavities_run_together_are_not_drawn_as_one_hull() -> None:
    # Prepare: two bright cavities side by side joined by a thin bright bridge (a model that
    # took the RV with the LV): one region, far from convex
    shape = (120, 120)
    both = _disc(shape, (60.0, 40.0), 12.0) | _disc(shape, (60.0, 84.0), 12.0)
    both[59:62, 40:84] = True
    frame = np.random.default_rng(0).normal(100, 5, size=shape).astype(np.float32)
    frame[both] += 800
    cavity_task = Segmenter(BrightIsBloodPool(), GRID, torch.device("cpu"),
                            convex_classes=get_task("sax_seg").convex_classes)

    # Execute
    labels = segment_stack(cavity_task, [frame], (1.0, 1.0))[0] == 1

    # Assert: the region stays as predicted; its hull would take the space between them
    assert _dice(labels, both) > 0.9 and not labels[52, 62] and convex_hull(both)[52, 62]


def _nnunet_folder(root: Path) -> dict[str, np.ndarray]:
    truths = {}
    (root / "imagesTs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 3},
                                                   "channel_names": {"0": "cine"}}))
    for case, (shape, zooms, centre) in {
        "shifted": ((120, 100, 1), (1.3, 1.3, 10.0), (20.0, 70.0)),
        "zoomed": ((150, 150, 2), (0.6, 0.6, 8.0), (80.0, 90.0)),
    }.items():
        truth = _disc(shape[1::-1], centre, 12.0 / zooms[0])  # (rows, cols)
        data = np.random.default_rng(1).normal(30, 3, size=shape).astype(np.float32)
        for z in range(shape[2]):
            data[:, :, z][truth.T] += 200
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = [5.0, -7.0, 11.0]
        image = nib.Nifti1Image(data, affine)
        image.header.set_zooms(zooms)
        nib.save(image, str(root / "imagesTs" / f"{case}_0000.nii.gz"))
        truths[case] = truth
    return truths


def test_nnunet_masks_have_the_images_shape_affine_and_label_values(tmp_path: Path) -> None:
    truths = _nnunet_folder(tmp_path / "ds")
    counts = predict_nnunet(_segmenter(), get_task("sax_seg"), tmp_path / "ds", tmp_path / "out")
    assert counts["cases"] == 2
    for case, truth in truths.items():
        image = nib.load(tmp_path / "ds" / "imagesTs" / f"{case}_0000.nii.gz")
        mask = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert mask.shape == image.shape
        assert np.allclose(mask.affine, image.affine)
        data = np.asarray(mask.dataobj)
        assert set(np.unique(data)) <= {0, 3}  # the dataset's own value for the LV
        assert _dice(data[:, :, 0].T == 3, truth) > 0.9


def test_dicom_series_gets_a_nifti_in_its_geometry_and_a_seg_referencing_it(tmp_path: Path) -> None:
    # Prepare: an oblique cine SAX whose disc is off the image centre
    truth = write_cine_series(tmp_path / "export", slices=3, phases=4, rows=48, cols=56,
                              spacing=(1.5, 1.25))

    # Execute
    counts = predict_dicom(_segmenter(), get_task("sax_seg"), tmp_path / "export", tmp_path / "out")

    # Assert: the NIfTI
    assert counts["series"] == 1
    image = nib.load(tmp_path / "out" / f"{truth.series_uid}.nii.gz")
    assert image.shape == (56, 48, 3, 4)  # column, row, slice, phase
    data = np.asarray(image.dataobj)
    expected = np.stack([[f > 300 for f in row] for row in truth.frames])  # (S, T, rows, cols)
    assert _dice(data.transpose(2, 3, 1, 0) == 1, expected) > 0.9
    first = pydicom.dcmread(truth.files[0])
    stacks, _ = read_dicom_stacks(tmp_path / "export")
    grid = stack_grid(stacks[0])
    voxel = np.array([3, 5, 1, 1.0])  # column 3, row 5 of slice 1
    frame = grid[1][0].dataset
    iop = np.asarray(frame.ImageOrientationPatient, dtype=float)
    lps = (np.asarray(frame.ImagePositionPatient, dtype=float) + 3 * iop[:3] * float(frame.PixelSpacing[1])
           + 5 * iop[3:] * float(frame.PixelSpacing[0]))
    assert np.allclose(image.affine @ voxel, [-lps[0], -lps[1], lps[2], 1.0], atol=1e-3)
    assert np.allclose(nifti_affine(grid), image.affine)
    # the DICOM SEG: one instance per phase, one series, referencing every source instance
    segs = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").glob(f"{truth.series_uid}.seg-t*.dcm"))]
    assert len(segs) == 4 and len({s.SeriesInstanceUID for s in segs}) == 1
    referenced = set()
    for t, seg in enumerate(segs):
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == first.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == truth.series_uid
        instances = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert instances == {row[t] for row in truth.sop_uids}
        referenced |= instances
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lv_blood", "lv_myo", "rv_blood"]
    assert referenced == {u for row in truth.sop_uids for u in row}


def test_cli_predict_on_dicom_and_nnunet_folders(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from client.cli import app
    from shared_model.bundle import save_task_bundle
    from shared_model.config import load_config
    from shared_model.encoders import build_encoder
    from shared_model.tasks.models import build_task_model

    cfg = load_config("demo-cpu", ["device=cpu"])
    torch.manual_seed(0)
    model = build_task_model(get_task("sax_seg"), build_encoder(cfg.model.preset), 8)
    save_task_bundle(tmp_path / "bundle", cfg, get_task("sax_seg"), model)
    write_cine_series(tmp_path / "export", slices=2, phases=3, rows=40, cols=40)
    _nnunet_folder(tmp_path / "ds")
    runner = CliRunner()
    for source, expected in ((tmp_path / "export", "1 series predicted (dicom input)"),
                             (tmp_path / "ds" / "imagesTs", "2 cases predicted (nnunet input)")):
        result = runner.invoke(app, ["predict", "--task", "sax_seg", "--model", str(tmp_path / "bundle"),
                                     str(source), "--out", str(tmp_path / f"{source.name}-out"), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert expected in result.output
    assert len(list((tmp_path / "export").glob("*"))) == 6  # the export is read, never written
    assert len(list((tmp_path / "export-out").glob("*.seg-t*.dcm"))) == 3
