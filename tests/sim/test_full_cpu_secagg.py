"""The full-cpu scenario's federation under SecAgg+: its pretraining arm and the federated
fine-tuning of all nine tasks from that arm's encoder, through the scenario's own functions on
its synthetic cohort (3 sites, sized down: fewer subjects, steps and seeds), with no halted round.
Before updates travelled as scaled differences, this fine-tuning halted secure aggregation in
over 300 rounds (weights outside SecAgg+'s clipping range)."""

from pathlib import Path

import pytest

from server.metrics import RecordKind, read_records
from shared_model.config import config_from_yaml, load_config, secagg_enabled
from sim.scenario import federated_arm, federated_finetune, prepare_sites

SMALL = ["sim.subjects_per_site=2", "sim.cine_phases=4", "ssl.local_steps=2", "ssl.batch_size=4",
         "tasks.steps=3", "tasks.batch_size=4", "federation.rounds=1", "sim.seeds=[0]",
         "sim.federated_finetune_budgets=[1]", "sim.federated_finetune_arms=[fed-mae-secagg]",
         "device=cpu", "federation.round_timeout_s=300", "federation.secagg.timeout_s=300"]


@pytest.mark.reliability(7)
def test_the_full_cpu_federation_runs_under_secagg_with_no_halted_round(tmp_path: Path) -> None:
    # Prepare: the full-cpu cohort of 3 sites, ingested
    cfg = load_config("full-cpu", [*SMALL, f"output.dir={tmp_path / 'unused'}"])
    sites = prepare_sites(cfg, tmp_path)
    assert len(sites) == 3 and len(cfg.tasks.names) == 9
    arm = next(a for a in cfg.sim.federated_arms if a.name == "fed-mae-secagg")

    # Execute: the SecAgg+ pretraining arm, then every task fine-tuned federated from it (3
    # sites: SecAgg+ by default)
    pretrained = federated_arm(cfg, arm, tmp_path, sites)
    rows = federated_finetune(cfg, {arm.name: pretrained}, sites, tmp_path)

    # Assert: every round of both runs went through secure aggregation and was aggregated
    for run in ("fed-mae-secagg", "federated-finetune"):
        config = tmp_path / "arms" / run / "config.yaml"
        assert secagg_enabled(config_from_yaml(config.read_text(), str(config))), run
        fits = [r for r in read_records(tmp_path / "arms" / run) if r["kind"] == RecordKind.fit]
        assert fits and [r["status"] for r in fits] == ["aggregated"] * len(fits), run
        assert all(len(r["sites"]) == 3 for r in fits), run
    phases = {r["phase"] for r in read_records(tmp_path / "arms" / "federated-finetune")
              if r["kind"] == RecordKind.fit}
    assert len(phases) == 9
    assert {r.task for r in rows} == set(cfg.tasks.names)
