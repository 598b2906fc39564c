"""Federations on Flower's simulation engine: SecAgg+, drop-outs, bad updates, resume, budget."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.metrics import read_records
from server.run_status import RunStatus
from server.ledger import PrivacyLedger
from server.state import load_state
from shared_model.privacy import epsilon_for
from shared_model.weights import load_safetensors
from shared_model.phase_models import initial_ssl_model
from tests.server.federation_helpers import (
    corrupt_reply,
    drop_at_stage,
    drop_during_masking,
    fail_plain_fit,
    federate,
    make_sites,
    record_stages,
)


@pytest.fixture(scope="module")
def sites3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sites(tmp_path_factory.mktemp("sites"), 3)


def _encoder(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "release" / "encoder.safetensors")[0]


@pytest.mark.reliability(7)
def test_secagg_and_plain_aggregation_agree(tmp_path: Path, sites3: Path) -> None:
    # Same sites, same seeds, one round: only the aggregation path differs.
    _, plain = federate(tmp_path / "plain", sites3, 3, ["federation.rounds=1", "federation.secagg.mode=never"])
    _, secure = federate(tmp_path / "secure", sites3, 3, ["federation.rounds=1", "federation.secagg.mode=always"])
    assert plain.status == secure.status == RunStatus.released
    a, b = _encoder(tmp_path / "plain"), _encoder(tmp_path / "secure")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # SecAgg+'s quantisation bound: sites * step * max_weight / (sum of example weights), the
    # nodes send their updates scaled so that step = 2 * max_weight_change / quantization_range
    # in weight units (16 images per site here), plus float32 rounding of the weights.
    bound = 3 * (2 * 1.0 / 4194304) * 1000 / (3 * 16) + 1e-6
    assert 0 < worst < bound
    record = read_records(tmp_path / "secure")[-1]
    assert record["status"] == "aggregated" and len(record["sites"]) == 3


@pytest.mark.reliability(8)
def test_secagg_round_survives_a_dropped_site(tmp_path: Path, sites3: Path) -> None:
    _, status = federate(tmp_path / "run", sites3, 3, ["federation.rounds=1", "federation.secagg.mode=always"],
                         extra_mods=[drop_during_masking(site=2)])
    assert status.status == RunStatus.released
    record = read_records(tmp_path / "run")[0]
    assert record["status"] == "aggregated" and set(record["sites"]) == {"site-0", "site-1"}
    assert all(torch.isfinite(v).all() for v in _encoder(tmp_path / "run").values())


def _worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.reliability(8)
def test_a_site_lost_during_key_sharing_leaves_the_survivors_sum(tmp_path: Path, sites3: Path) -> None:
    # Prepare / Execute: site 2 answers the key set-up, then vanishes while keys are shared (its
    # shares never reach the others); against a plain round without site 2
    _, secure = federate(tmp_path / "secure", sites3, 3, ["federation.rounds=1", "federation.secagg.mode=always"],
                         extra_mods=[drop_at_stage(2, "share_keys")])
    _, plain = federate(tmp_path / "plain", sites3, 3, ["federation.rounds=1", "federation.secagg.mode=never"],
                        extra_mods=[fail_plain_fit(2)])
    # Assert: aggregated from the two survivors, equal to their plain mean within SecAgg+'s
    # quantisation (Flower alone asks the survivors for the lost site's shares and halts)
    assert secure.status == plain.status == RunStatus.released
    record = read_records(tmp_path / "secure")[0]
    assert record["status"] == "aggregated" and set(record["sites"]) == {"site-0", "site-1"}
    bound = 2 * (2 * 1.0 / 4194304) * 1000 / (2 * 16) + 1e-6
    assert _worst_difference(_encoder(tmp_path / "secure"), _encoder(tmp_path / "plain")) < bound


@pytest.mark.reliability(8)
def test_too_many_drop_outs_abort_the_round_unmask_nothing_and_the_next_round_succeeds(
        tmp_path: Path, sites3: Path) -> None:
    # Prepare: two of three sites vanish after key sharing in round 1 (threshold 2: one survivor)
    secure = ["federation.rounds=2", "federation.secagg.mode=always"]
    stages = tmp_path / "stages-site0.txt"
    cfg, paused = federate(tmp_path / "run", sites3, 3, [*secure, "output.stop_after_round=1"],
                           extra_mods=[drop_during_masking(1, round_=1), drop_during_masking(2, round_=1),
                                       record_stages(0, stages)])

    # Assert: round 1 halted, the survivor was never asked to unmask, the model is the initial one
    assert paused.status == RunStatus.paused
    assert [r["status"] for r in read_records(tmp_path / "run")] == ["halted"]
    assert "unmask" not in stages.read_text().split()
    state = load_state(tmp_path / "run", cfg)
    initial = initial_ssl_model(cfg).state_dict()
    assert state.phase_keys and all(np.array_equal(a, initial[k].numpy())
                                    for k, a in zip(state.phase_keys, state.phase_arrays, strict=True))

    # Execute: the run goes on with every site
    _, done = federate(tmp_path / "run", sites3, 3, [*secure, "output.resume=true"])

    # Assert: round 2 aggregated all three
    assert done.status == RunStatus.released
    last = read_records(tmp_path / "run")[-1]
    assert last["status"] == "aggregated" and set(last["sites"]) == {"site-0", "site-1", "site-2"}


@pytest.mark.reliability(5)
def test_bad_updates_are_excluded(tmp_path: Path, sites3: Path) -> None:
    faults = [corrupt_reply(0, 1, lambda arrays: [np.full_like(a, np.nan) for a in arrays]),
              corrupt_reply(1, 2, lambda arrays: [arrays[0][..., :1], *arrays[1:]]),
              corrupt_reply(2, 3, lambda arrays: [a + 1e4 for a in arrays])]
    _, status = federate(tmp_path / "run", sites3, 3, ["federation.rounds=3", "federation.secagg.mode=never"],
                         extra_mods=faults)
    assert status.status == RunStatus.released
    records = read_records(tmp_path / "run")
    assert [list(r["excluded"]) for r in records] == [["site-0"], ["site-1"], ["site-2"]]
    assert "non-finite" in records[0]["excluded"]["site-0"]
    assert "shape" in records[1]["excluded"]["site-1"]
    assert "update norm" in records[2]["excluded"]["site-2"]
    assert all(r["status"] == "aggregated" for r in records)
    assert all(torch.isfinite(v).all() for v in _encoder(tmp_path / "run").values())


@pytest.mark.reliability(5)
def test_a_run_whose_every_reply_is_excluded_releases_nothing(tmp_path: Path) -> None:
    # Prepare: both sites send non-finite weights in the only round
    sites = make_sites(tmp_path / "sites", 2)
    faults = [corrupt_reply(site, 1, lambda arrays: [np.full_like(a, np.nan) for a in arrays])
              for site in (0, 1)]

    # Execute
    _, status = federate(tmp_path / "run", sites, 2, ["federation.rounds=1", "federation.secagg.mode=never"],
                         extra_mods=faults)

    # Assert: the round is recorded as skipped, and the untrained start is not released as a model
    assert [r["status"] for r in read_records(tmp_path / "run")] == ["skipped"]
    assert status.status == RunStatus.failed and "no round of pretrain aggregated" in status.detail
    assert not (tmp_path / "run" / "release").exists()


@pytest.mark.reliability(12)
@pytest.mark.parametrize("kept", [
    [],  # the token MAE's decoder stays at the nodes (federation.ssl_head=auto)
    ["ssl.method=dino", "ssl.dino.teacher=local_ema", "ssl.dino.out_dim=64"],  # each node's teacher
], ids=["mae-local-decoder", "dino-local-teacher"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path: Path, kept: list[str]) -> None:
    # Prepare: the same 2-round federation twice, once straight through, once paused after
    # round 1 and resumed (no DP: its noise is drawn afresh, never predictable); what the nodes
    # keep between rounds (a decoder, a teacher) is kept in their state folders across the pause
    sites = make_sites(tmp_path / "sites", 2)
    plain = ["federation.rounds=2", "federation.secagg.mode=never", *kept]
    _, straight = federate(tmp_path / "straight", sites, 2, plain)
    cfg, paused = federate(tmp_path / "run", sites, 2, [*plain, "output.stop_after_round=1"])
    assert paused.status == RunStatus.paused and not (tmp_path / "run" / "release").exists()
    after_one = load_state(tmp_path / "run", cfg)

    # Execute
    _, resumed = federate(tmp_path / "run", sites, 2, [*plain, "output.resume=true"])

    # Assert: round 2 ran once, from the checkpoint, and ends where the straight run ends ...
    assert straight.status == resumed.status == RunStatus.released
    assert after_one.global_round == 1
    assert [r["round"] for r in read_records(tmp_path / "run")] == [1, 2]
    final, reference = _encoder(tmp_path / "run"), _encoder(tmp_path / "straight")
    assert set(final) == set(reference)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=1e-6)
    # ... which is not where round 1 ended (round 2 trained)
    round_one = {k.removeprefix("encoder."): torch.from_numpy(a)
                 for k, a in zip(after_one.phase_keys, after_one.phase_arrays) if k.startswith("encoder.")}
    assert set(round_one) == set(reference)
    assert max(float((reference[k] - round_one[k]).abs().max()) for k in reference) > 1e-4


@pytest.mark.reliability(10)
def test_a_resumed_run_keeps_the_privacy_ledger(tmp_path: Path) -> None:
    # Prepare
    sites = make_sites(tmp_path / "sites", 2)
    dp = ["privacy.mode=user", "privacy.noise_multiplier=2.0", "privacy.update_clip_norm=5.0",
          "federation.rounds=2"]
    cfg, paused = federate(tmp_path / "run", sites, 2, [*dp, "output.stop_after_round=1"])
    assert paused.status == RunStatus.paused
    one_round = PrivacyLedger.from_json(load_state(tmp_path / "run", cfg).ledger_json)

    # Execute
    _, done = federate(tmp_path / "run", sites, 2, [*dp, "output.resume=true"])

    # Assert: the checkpoint held one round's ledger; the release's is that of an
    # uninterrupted 2-round run
    assert done.status == RunStatus.released
    assert one_round.epsilon("all-sites", "user") == pytest.approx(epsilon_for([[2.0, 1.0, 1]], 1e-5))
    card = (tmp_path / "run" / "release" / "model_card.md").read_text()
    expected = epsilon_for([[2.0, 1.0, 2]], 1e-5)
    assert f"{expected:.4g}" in card


@pytest.mark.reliability(10)
def test_budget_too_small_stops_before_release(tmp_path: Path) -> None:
    sites = make_sites(tmp_path / "sites", 2)
    one, two = epsilon_for([[2.0, 1.0, 1]], 1e-5), epsilon_for([[2.0, 1.0, 2]], 1e-5)
    _, status = federate(tmp_path / "run", sites, 2, [
        "privacy.mode=user", "privacy.noise_multiplier=2.0", "federation.rounds=3",
        f"privacy.epsilon_budget={(one + two) / 2:.4f}"])  # room for one round, not two
    assert status.status == RunStatus.stopped and "epsilon_budget" in status.detail
    assert not (tmp_path / "run" / "release").exists()
    assert [r["round"] for r in read_records(tmp_path / "run")] == [1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"
