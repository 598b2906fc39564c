"""A 2-site, 1-round, 1-budget scenario end to end: cohort, intake, arms, fine-tuning, report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.results import ArmKind, ScenarioResults

TINY = ["sim.sites=2", "sim.subjects_per_site=3", "sim.cine_phases=4", "sim.max_sax_slices=4",
        "sim.seeds=[0]", "sim.label_budgets=[1]", "federation.rounds=1", "federation.finetune_rounds=1",
        "ssl.local_steps=1", "ssl.batch_size=8", "tasks.steps=1", "tasks.batch_size=4",
        "ssl.mae.decoder_depth=1", "ssl.mae.decoder_dim=32", "device=cpu"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("scenario")
    proc = subprocess.run([sys.executable, "-m", "sim", "run", "demo-cpu", "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=900)
    return out, proc


def test_scenario_writes_report_results_and_config(scenario) -> None:
    out, proc = scenario
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.md", "report.html", "results.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert str(out / "report.md") in proc.stdout.replace("\n", "")
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "fed-mae" in report


def test_results_schema(scenario) -> None:
    out, _ = scenario
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "fedcmr-sim-results" and results["version"] == 1
    assert [s["name"] for s in results["scenario"]["sites"]] == ["site-0", "site-1"]
    assert set(results["arms"]) == {"fed-mae", "local-mae", "central-mae", "scratch", "unet"}
    assert {a["kind"] for a in results["arms"].values()} == {"federated", "local", "central", "scratch",
                                                             "supervised"}
    rows = results["finetune"]
    assert {r["mode"] for r in rows} == {"local", "federated"}
    assert {r["task"] for r in rows} == {"sax_seg", "view", "landmarks"}
    for row in rows:
        assert {"arm", "task", "budget", "seed", "mode", "site", "metric", "value", "metrics",
                "test_samples"} <= set(row)
        assert row["budget"] == 1 and row["seed"] == 0
    fed = [r for r in rows if r["mode"] == "federated" and r["site"] == "all"]
    assert {r["arm"] for r in fed} == {"fed-mae", "scratch"}
    assert any(c["arm"] == "fed-mae" and c["site"] == "all" for c in results["curves"])
    assert all((out / o["file"]).is_file() for o in results["overlays"])
    assert {o["task"] for o in results["overlays"]} == {"sax_seg", "landmarks"}
    assert results["timings_s"]["total"] > 0
    parsed = ScenarioResults.from_json(results, "results.json")  # the report reads it back whole
    assert {a.kind for a in parsed.arms.values()} == set(ArmKind)
    assert len(parsed.finetune) == len(rows) and parsed.scenario.arms == tuple(results["arms"])


def test_a_bad_real_site_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # Prepare
    from typer.testing import CliRunner

    from sim.cli import app

    # Execute: no synthetic sites, one real site whose folder does not exist
    result = CliRunner().invoke(app, ["run", "demo-cpu", "--out", str(tmp_path / "run"), "sim.sites=0",
                                      f"sim.real_sites=[dicom:{tmp_path / 'nowhere'}]"])

    # Assert: the intake's message, no traceback
    assert result.exit_code == 2, result.output
    assert "nowhere does not exist" in result.output and "Traceback" not in result.output


@pytest.mark.reliability(16)
def test_no_planted_phi_string_leaves_the_hospital_exports(scenario) -> None:
    # Every PHI string the cohort planted in its DICOM headers, searched for in everything the
    # run wrote outside those exports (stores, node audit logs of every reply a node sent,
    # checkpoints, metrics, TensorBoard events, release, results, report, plots) and in
    # everything it printed
    out, proc = scenario
    assert proc.returncode == 0, proc.stderr[-3000:]
    cohort = out / "cohort"
    planted = sorted({value for path in cohort.glob("site-*/planted_phi.json")
                      for value in json.loads(path.read_text())})
    assert len(planted) >= 20
    written = [p for p in out.rglob("*") if p.is_file() and cohort not in p.parents]
    audits = [p for p in written if p.name == "node-audit.jsonl"]
    assert audits and all(p.read_text().strip() for p in audits)  # the nodes logged their replies
    assert any(p.suffix == ".safetensors" for p in written) and any("tfevents" in p.name for p in written)
    printed = (proc.stdout + proc.stderr).encode()
    hits = [(value, str(p)) for p in written for value in planted if value.encode() in p.read_bytes()]
    hits += [(value, "console") for value in planted if value.encode() in printed]
    assert hits == []


@pytest.mark.reliability(16)
def test_no_planted_phi_string_is_in_the_bytes_a_node_sends(scenario, tmp_path: Path) -> None:
    # Prepare: the scenario's stores, ingested from exports with planted PHI in their headers
    from tests.server.federation_helpers import federate, record_sent

    out, proc = scenario
    assert proc.returncode == 0, proc.stderr[-3000:]
    planted = sorted({value for path in (out / "cohort").glob("site-*/planted_phi.json")
                      for value in json.loads(path.read_text())})
    sent = tmp_path / "sent.bin"
    # Execute: a pretraining round and a federated fine-tuning round over those stores, every
    # reply's raw bytes (weight buffers, metrics, configs) recorded as it leaves the node
    _, outcome = federate(tmp_path / "run", out / "sites", 2,
                          ["federation.rounds=1", "federation.finetune_rounds=1", "tasks.names=[sax_seg]",
                           "tasks.steps=1", "tasks.batch_size=4"], extra_mods=[record_sent(sent)])
    # Assert: the nodes sent weights, and no planted string is in them, in UTF-8 or UTF-16
    data = sent.read_bytes()
    assert outcome.status.value == "released" and len(data) > 100_000
    hits = [v for v in planted for encoded in (v.encode(), v.encode("utf-16-le")) if encoded in data]
    assert hits == []


def test_federated_fine_tuning_starts_from_a_released_foundation_model(scenario, tmp_path: Path) -> None:
    # Prepare: the scenario's federated foundation model, as released
    import torch

    from shared_model.bundle import load_bundle
    from tests.server.federation_helpers import federate

    out, proc = scenario
    assert proc.returncode == 0, proc.stderr[-3000:]
    foundation = load_bundle(out / "arms" / "fed-mae" / "release")
    # Execute: fine-tuning only (no pretraining), the encoder frozen
    _, outcome = federate(tmp_path / "run", out / "sites", 2,
                          ["federation.rounds=0", "federation.finetune_rounds=1", "tasks.names=[sax_seg]",
                           "tasks.steps=1", "tasks.batch_size=4", "tasks.mode=linear",
                           f"federation.foundation={foundation.root}"])
    # Assert: the released task model holds the foundation's encoder, unchanged
    assert outcome.status.value == "released", outcome.detail
    released = load_bundle(Path(outcome.detail))
    task = released.tasks["sax_seg"]
    encoder = {k.removeprefix("encoder."): v for k, v in task.items() if k.startswith("encoder.")}
    assert encoder.keys() == foundation.encoder.keys()
    assert all(torch.equal(encoder[k], foundation.encoder[k]) for k in encoder)
