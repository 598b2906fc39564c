"""The scenario report says the right numbers and sentences, and never crashes on a thin run."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from shared_model.labels import MASK_VALUES
from sim.report import (budget_label, dice_per_structure, headline, landmark_errors_mm, mean_ci,
                        plain_statements, write_report)
from sim.results import FinetuneMode, ResultsError, ScenarioResults

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("site-0", "site-1")
SEEDS = (0, 1, 2)
BUDGETS = (1, 2, 0)  # 0 = all labelled subjects
SITE_OFFSET = {"site-0": -0.02, "site-1": 0.02}  # symmetric: the mean over sites is the base
SEED_OFFSET = {0: -0.01, 1: 0.0, 2: 0.01}  # symmetric: the mean over seeds is the base
METRICS = {"sax_seg": "dice_mean", "view": "balanced_accuracy", "landmarks": "landmark_error_mm"}
# Mean headline value per task, arm and budget (1, 2, all). Landmark error: lower is better.
BASE = {
    "sax_seg": {"fed-mae": (0.80, 0.85, 0.85), "local-mae": (0.78, 0.83, 0.87),
                "central-mae": (0.82, 0.86, 0.90), "scratch": (0.75, 0.80, 0.86),
                "fed-mae-dp2": (0.70, 0.75, 0.80), "fed-mae-dp8": (0.76, 0.80, 0.83)},
    "view": {"fed-mae": (0.60, 0.70, 0.80), "local-mae": (0.58, 0.66, 0.78),
             "central-mae": (0.62, 0.72, 0.82), "scratch": (0.64, 0.72, 0.80),
             "fed-mae-dp2": (0.50, 0.60, 0.70), "fed-mae-dp8": (0.55, 0.65, 0.75)},
    "landmarks": {"fed-mae": (3.0, 2.6, 2.2), "local-mae": (4.0, 2.5, 2.4),
                  "central-mae": (2.8, 2.5, 2.1), "scratch": (2.5, 2.7, 2.6),
                  "fed-mae-dp2": (4.5, 4.0, 3.5), "fed-mae-dp8": (3.5, 3.0, 2.5)},
}
# Where the FM (fed-mae) is not better, read off BASE by hand (the view tie at "all" counts).
NOT_BETTER = {("scratch", "sax_seg", 0), ("scratch", "view", 1), ("scratch", "view", 2),
              ("scratch", "view", 0), ("scratch", "landmarks", 1),
              ("local-only pretraining", "sax_seg", 0), ("local-only pretraining", "landmarks", 2)}
ARMS = {
    "fed-mae": {"kind": "federated", "method": "mae", "secagg": False, "dp_mode": "none",
                "epsilon": None, "teacher": None, "rounds": 3, "images_seen": 5760,
                "seconds": 61.2},
    "fed-mae-dp2": {"kind": "federated", "method": "mae", "secagg": True, "dp_mode": "user",
                    "epsilon": 2.0, "teacher": None, "rounds": 3},
    "fed-mae-dp8": {"kind": "federated", "method": "mae", "secagg": True, "dp_mode": "user",
                    "epsilon": 8.0, "teacher": None, "rounds": 3},
    "local-mae": {"kind": "local", "method": "mae", "dp_mode": "none", "rounds": 3},
    "central-mae": {"kind": "central", "method": "mae", "dp_mode": "none", "rounds": 3},
    "scratch": {"kind": "scratch", "method": None, "dp_mode": "none"},
}


def _finetune_rows() -> list[dict]:
    """Local rows for every arm (one per site and seed); federated rows for all but local-mae."""
    rows = []
    for task, per_arm in BASE.items():
        for arm, values in per_arm.items():
            for budget, base in zip(BUDGETS, values):
                for seed in SEEDS:
                    common = {"arm": arm, "task": task, "budget": budget, "seed": seed,
                              "metric": METRICS[task], "metrics": {}, "test_samples": 8}
                    rows += [dict(common, mode="local", site=site,
                                  value=base + SITE_OFFSET[site] + SEED_OFFSET[seed])
                             for site in SITES]
                    if arm != "local-mae":
                        rows.append(dict(common, mode="federated", site="all",
                                         value=base + SEED_OFFSET[seed]))
    return rows


def _curves() -> list[dict]:
    rows = []
    for r in (1, 2, 3):
        for arm in ("fed-mae", "central-mae"):
            rows.append({"arm": arm, "round": r, "site": "all", "loss": 1.0 / r, "embed_std": 0.01})
        rows += [{"arm": "local-mae", "round": r, "site": s, "loss": 1.1 / r} for s in SITES]
    return rows


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def _phantom_mask(shift: int = 0) -> np.ndarray:
    """LV blood pool inside a myocardial ring, RV beside it (64 x 64 px)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[_disc(mask.shape, (32, 36 + shift), 14)] = MASK_VALUES["lv_myo"]
    mask[_disc(mask.shape, (32, 36 + shift), 9)] = MASK_VALUES["lv_blood"]
    mask[_disc(mask.shape, (32, 14 + shift), 8) & (mask == 0)] = MASK_VALUES["rv_blood"]
    return mask


def _write_overlays(run_dir: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    true = _phantom_mask()
    image = np.clip(0.2 + 0.5 * (true == 1) + 0.25 * (true == 3) + rng.normal(0, 0.05, true.shape),
                    0, 1)
    (run_dir / "overlays").mkdir(parents=True)
    np.savez(run_dir / "overlays/sax_seg-site-0.npz", image=image, true_mask=true,
             pred_mask=_phantom_mask(shift=1))
    points = np.array([[20.0, 22.0], [44.0, 22.0]])
    np.savez(run_dir / "overlays/landmarks-site-0.npz", image=image, true_points=points,
             pred_points=points + [3.0, 4.0], spacing_mm=np.float64(1.25),
             names=np.array(["rv_insertion_anterior", "rv_insertion_inferior"], dtype="U32"))
    return [{"task": "sax_seg", "arm": "fed-mae", "site": "site-0",
             "file": "overlays/sax_seg-site-0.npz"},
            {"task": "landmarks", "arm": "fed-mae", "site": "site-0",
             "file": "overlays/landmarks-site-0.npz"}]


def _results(overlays: list[dict] | None = None) -> dict:
    return {
        "format": "fedcmr-sim-results", "version": 1,
        "scenario": {"name": "demo", "config": "config.yaml",
                     "sites": [{"name": s, "source": "synthetic", "vendor": "siemens",
                                "field_strength_t": 1.5, "subjects": 3} for s in SITES],
                     "tasks": list(BASE), "label_budgets": list(BUDGETS), "seeds": list(SEEDS),
                     "arms": list(ARMS)},
        "timings_s": {"cohort": 20.1, "intake": 15.3, "pretraining": 120.0, "finetuning": 300.2,
                      "total": 470.0},
        "arms": copy.deepcopy(ARMS),
        "curves": _curves(),
        "finetune": _finetune_rows(),
        "overlays": overlays or [],
    }


def _without_arms(results: dict, names: set[str]) -> dict:
    out = copy.deepcopy(results)
    out["arms"] = {k: v for k, v in out["arms"].items() if k not in names}
    out["scenario"]["arms"] = [a for a in out["scenario"]["arms"] if a not in names]
    out["finetune"] = [r for r in out["finetune"] if r["arm"] not in names]
    out["curves"] = [r for r in out["curves"] if r["arm"] not in names]
    return out


def _only_tasks(results: dict, tasks: list[str]) -> dict:
    out = copy.deepcopy(results)
    out["scenario"]["tasks"] = tasks
    out["finetune"] = [r for r in out["finetune"] if r["task"] in tasks]
    return out


def _images(report: Path) -> list[Path]:
    return [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def _assert_valid_pngs(report: Path) -> None:
    for path in _images(report):
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def _not_better(statements: list[str]) -> set[tuple[str, str, int]]:
    """(baseline, task, budget) of every 'does not beat' sentence."""
    out = set()
    for s in statements:
        m = re.search(r"does not beat (scratch|local-only pretraining) on (\w+) with (\S+)", s)
        if m:
            out.add((m.group(1), m.group(2), 0 if m.group(3) == "all" else int(m.group(3))))
    return out


# ---------------------------------------------------------------------------- numbers


def test_mean_ci_is_the_student_t_interval():
    # Prepare: sd 1, n 3, t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 / np.sqrt(3)
    # Execute
    stat, single, empty = mean_ci([1.0, 2.0, 3.0]), mean_ci([0.5]), mean_ci([float("nan")])
    # Assert
    assert stat.mean == pytest.approx(2.0) and stat.n == 3
    assert (stat.low, stat.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert (single.mean, single.low, single.high, single.n) == (0.5, None, None, 1)
    assert empty is None


def test_headline_matches_hand_computed_values_for_segmentation():
    # Prepare: local-mae has no federated rows, so every number is from local fine-tuning
    results = _results()
    # Execute
    h = headline(ScenarioResults.from_json(results))
    # Assert
    assert (h.task, h.budget, h.metric, h.higher_is_better, h.fm_arm, h.mode) \
        == ("sax_seg", 1, "dice_mean", True, "fed-mae", FinetuneMode.local)
    assert h.fm == pytest.approx(0.80) and h.scratch == pytest.approx(0.75)
    assert h.local == pytest.approx(0.78) and h.central == pytest.approx(0.82)
    assert h.gap_vs_scratch == pytest.approx(0.05)
    assert h.gap_vs_local == pytest.approx(0.02)
    assert h.fed_central_ratio == pytest.approx(0.80 / 0.82)


def test_headline_inverts_gap_and_ratio_for_landmark_error():
    # Prepare: landmarks only; FM 3.0 mm, scratch 2.5 mm, local 4.0 mm, central 2.8 mm
    results = _only_tasks(_results(), ["landmarks"])
    # Execute
    h = headline(ScenarioResults.from_json(results))
    # Assert: positive = FM better; ratio central/fed so > 1 would mean FM better
    assert h.task == "landmarks" and h.higher_is_better is False
    assert h.gap_vs_scratch == pytest.approx(-0.5)
    assert h.gap_vs_local == pytest.approx(1.0)
    assert h.fed_central_ratio == pytest.approx(2.8 / 3.0)


def test_headline_local_is_the_mean_over_local_only_arms():
    # Prepare: a second local-only arm 0.04 below local-mae everywhere
    results = _results()
    extra = [dict(r, arm="local-dino", value=r["value"] - 0.04) for r in results["finetune"]
             if r["arm"] == "local-mae"]
    results["finetune"] += extra
    results["arms"]["local-dino"] = {"kind": "local", "method": "dino", "dp_mode": "none"}
    # Execute
    h = headline(ScenarioResults.from_json(results))
    # Assert
    assert h.local == pytest.approx((0.78 + 0.74) / 2)
    assert h.gap_vs_local == pytest.approx(0.80 - 0.76)


# ---------------------------------------------------------------------------- statements


def test_statements_say_does_not_beat_exactly_where_the_fm_is_not_better():
    # Prepare
    results = _results()
    # Execute
    statements = plain_statements(ScenarioResults.from_json(results))
    # Assert
    assert _not_better(statements) == NOT_BETTER
    wins = [s for s in statements if " beats " in s]
    assert len(wins) == 2  # one summary sentence per baseline
    assert any(s.startswith("Federated MAE pretraining beats scratch on 4 of 9") for s in wins)


def test_statements_give_the_margin_in_the_metric_direction():
    # Prepare: scratch vs FM is compared in federated fine-tuning (both arms have it)
    statements = plain_statements(ScenarioResults.from_json(_results()))
    # Execute
    by_key = {k: s for s in statements for k in _not_better([s])}
    # Assert
    assert by_key[("scratch", "view", 1)] == (
        "Federated MAE pretraining does not beat scratch on view with 1 labelled subject per "
        "site (federated fine-tuning): balanced accuracy 0.600 vs 0.640 (-0.040).")
    assert by_key[("scratch", "landmarks", 1)].endswith(
        "landmark error 3.000 mm vs 2.500 mm (+0.500 mm; lower is better).")
    assert "with all labelled subjects" in by_key[("scratch", "sax_seg", 0)]
    assert "(local fine-tuning): landmark error 2.600 mm vs 2.500 mm" in \
        by_key[("local-only pretraining", "landmarks", 2)]


# ---------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    """The report of the whole synthetic scenario, read from results.json (written once)."""
    run_dir = tmp_path_factory.mktemp("full")
    results = _results(_write_overlays(run_dir))
    (run_dir / "results.json").write_text(json.dumps(results))
    return write_report(run_dir)


def test_full_report_writes_markdown_html_and_valid_pngs(full_report):
    # Prepare
    run_dir = full_report.parent
    # Execute
    text, page = full_report.read_text(), (run_dir / "report.html").read_text()
    names = {p.name for p in _images(full_report)}
    # Assert
    assert full_report == run_dir / "report.md"
    assert {"few-shot-sax_seg.png", "few-shot-view.png", "few-shot-landmarks.png",
            "fed-central-ratio.png", "privacy-utility.png", "per-site.png",
            "training-curves.png"} <= names
    assert sum(n.startswith("overlay-") for n in names) == 2
    _assert_valid_pngs(full_report)
    assert all(f'src="{p.relative_to(run_dir).as_posix()}"' in page for p in _images(full_report))
    assert "does not beat scratch on view" in text and "skipped" not in text
    assert text.index("## Headline") < text.index("## Does federated") < text.index("## Scenario")


def test_budget_zero_is_shown_as_all_and_last(full_report):
    # Prepare
    text = full_report.read_text()
    # Execute
    labels = [budget_label(b) for b in BUDGETS]
    # Assert
    assert labels == ["1", "2", "all"]
    assert "| arm | k=1 | k=2 | k=all |" in text and "k=0" not in text
    assert "labelled subjects per site: 1, 2, all" in text


@pytest.mark.parametrize("case, expect_lines, missing_pngs", [
    ("no_dp", ["no privacy-utility plot", "No overlay examples"], ["privacy-utility.png"]),
    ("no_central", ["no fed/central ratio"], ["fed-central-ratio.png"]),
    ("single_budget_single_seed", ["Only one label budget (k=1)", "(n=1)"],
     ["few-shot-sax_seg.png"]),
    ("missing_overlay_no_curves", ["skipped: FileNotFoundError", "No pretraining curves"],
     ["training-curves.png"]),
])
def test_missing_sections_are_skipped_with_one_line(tmp_path, case, expect_lines, missing_pngs):
    # Prepare: one task and one DP arm keep it fast
    results = _without_arms(_only_tasks(_results(), ["sax_seg"]), {"fed-mae-dp8"})
    if case == "no_dp":
        results = _without_arms(results, {"fed-mae-dp2"})
    elif case == "no_central":
        results = _without_arms(results, {"central-mae"})
    elif case == "single_budget_single_seed":
        results["finetune"] = [r for r in results["finetune"]
                               if r["budget"] == 1 and r["seed"] == 0]
    elif case == "missing_overlay_no_curves":
        results["overlays"] = [{"task": "sax_seg", "arm": "fed-mae", "site": "site-0",
                                "file": "overlays/nowhere.npz"}]
        results["curves"] = []
    # Execute
    report = write_report(tmp_path, ScenarioResults.from_json(results))
    # Assert
    text = report.read_text()
    assert all(line in text for line in expect_lines)
    assert (tmp_path / "report.html").stat().st_size > 0
    _assert_valid_pngs(report)
    assert not any((tmp_path / "plots" / name).exists() for name in missing_pngs)


def test_no_central_arm_and_single_seed_leave_the_headline_partial():
    # Prepare
    results = _only_tasks(_without_arms(_results(), {"central-mae"}), ["sax_seg"])
    results["finetune"] = [r for r in results["finetune"] if r["seed"] == 0]
    # Execute
    h = headline(ScenarioResults.from_json(results))
    # Assert: FM at seed 0, local mode: mean over sites of 0.80 - 0.01
    assert h.central is None and h.fed_central_ratio is None
    assert h.fm == pytest.approx(0.79) and h.gap_vs_scratch == pytest.approx(0.05)


def test_empty_results_do_not_crash(tmp_path):
    # Prepare
    results = {"format": "fedcmr-sim-results", "version": 1}
    # Execute
    text = write_report(tmp_path, ScenarioResults.from_json(results)).read_text()
    # Assert
    assert "No fine-tuning results" in text
    assert headline(ScenarioResults.from_json(results)).fm is None


def test_a_newer_schema_is_refused_with_the_file_named(tmp_path):
    # Prepare
    (tmp_path / "results.json").write_text(json.dumps({"format": "fedcmr-sim-results",
                                                       "version": 2}))
    # Execute / Assert
    with pytest.raises(ResultsError, match="results.json.*version 2"):
        write_report(tmp_path)


# ---------------------------------------------------------------------------- overlays


def test_overlay_scores_match_hand_computed_values():
    # Prepare: a 2-pixel square shifted by one column; landmarks off by (3, 4) px at 1.25 mm
    true = np.zeros((4, 4), np.uint8)
    true[1:3, 1:3] = MASK_VALUES["lv_blood"]
    pred = np.roll(true, 1, axis=1)
    points = np.array([[10.0, 10.0], [20.0, 5.0]])
    # Execute
    dice = dice_per_structure(true, pred)
    errors = landmark_errors_mm(points, points + [3.0, 4.0], np.float64(1.25))
    # Assert: overlap 2 of 4 + 4 pixels
    assert dice == {"lv_blood": pytest.approx(0.5)}
    np.testing.assert_allclose(errors, [6.25, 6.25])
