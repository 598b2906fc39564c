"""results.json: the scenario's dataclasses written and read back unchanged; damage is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_model.config import PrivacyMode, SSLMethod
from sim.results import (Arm, ArmKind, Curve, FinetuneMode, FinetuneRow, Overlay, ResultsError, ScenarioInfo,
                         ScenarioResults, SiteInfo, load_results, write_results)


def _results() -> ScenarioResults:
    arms = {"fed-mae": Arm("fed-mae", ArmKind.federated, SSLMethod.mae, secagg=True, dp_mode=PrivacyMode.user,
                           epsilon=2.5, rounds=3, seconds=12.5, images_seen=640),
            "scratch": Arm("scratch", ArmKind.scratch, rounds=0, seconds=0.0)}
    return ScenarioResults(
        scenario=ScenarioInfo("demo", "config.yaml", (SiteInfo("site-0", "synthetic", "siemens", 1.5, 3),),
                              ("sax_seg",), (1, 0), (0,), tuple(arms)),
        timings_s={"sites": 1.5, "total": 9.0}, arms=arms,
        curves=(Curve("fed-mae", 1, "all", loss=0.9, embed_std=0.02),),
        finetune=(FinetuneRow("fed-mae", "sax_seg", 1, 0, FinetuneMode.local, "site-0", "dice_mean", 0.5,
                              {"dice_mean": 0.5, "hd95_mm_lv": None}, 8, ("s1",)),
                  FinetuneRow("scratch", "sax_seg", 0, 0, FinetuneMode.federated, "all", "dice_mean", None)),
        overlays=(Overlay("sax_seg", "fed-mae", "site-0", "overlays/sax_seg-site-0.npz"),))


def test_results_round_trip_through_the_file(tmp_path: Path) -> None:
    # Prepare
    results = _results()
    # Execute
    path = write_results(tmp_path, results)
    again = load_results(tmp_path)
    # Assert: the same dataclasses, and the JSON layout of schema version 1
    assert again == results
    raw = json.loads(path.read_text())
    assert (raw["format"], raw["version"]) == ("fedcmr-sim-results", 1)
    assert raw["arms"]["fed-mae"] == {"kind": "federated", "method": "mae", "secagg": True, "dp_mode": "user",
                                      "epsilon": 2.5, "teacher": None, "rounds": 3, "seconds": 12.5,
                                      "images_seen": 640}
    assert raw["finetune"][0]["mode"] == "local" and raw["finetune"][0]["test_subjects"] == ["s1"]


@pytest.mark.parametrize("damage, field", [
    (lambda r: r["finetune"][1].update(budget="one"), r"finetune\[1\]\.budget"),
    (lambda r: r["finetune"][0].update(mode="remote"), r"finetune\[0\]\.mode"),
    (lambda r: r["arms"]["scratch"].pop("kind"), r"arms\.scratch\.kind"),
    (lambda r: r["curves"][0].update(round=None), r"curves\[0\]\.round"),
    (lambda r: r["finetune"][0].update(arm="fed-dino"), r"finetune\[0\]\.arm.*'fed-dino'"),
    (lambda r: r["scenario"]["sites"][0].pop("name"), r"scenario\.sites\[0\]\.name"),
])
def test_a_damaged_field_is_named_with_the_file(tmp_path: Path, damage, field: str) -> None:
    # Prepare
    path = write_results(tmp_path, _results())
    raw = json.loads(path.read_text())
    damage(raw)
    path.write_text(json.dumps(raw))
    # Execute / Assert
    with pytest.raises(ResultsError, match=f"results.json: field '{field}"):
        load_results(tmp_path)


def test_missing_results_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="run the scenario first"):
        load_results(tmp_path)
