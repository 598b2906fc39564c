"""Server pieces without the engine: validation, ledger, checkpoint, node guard, strategy."""

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from typer.testing import CliRunner

from client.app import NodePolicy, NodePolicyError, check_secagg_request
from server import cli as server_cli
from server.aggregators import build_aggregator, optimizer_state, restore_optimizer_state
from server.ledger import LedgerEntry, LedgerError, PrivacyLedger
from server.metrics import RoundStatus
from server.state import (
    ResumeError,
    ServerState,
    config_fingerprint,
    load_state,
    save_state,
    weights_hash,
)
from server.strategy import PhaseInfo, PhaseStrategy
from server.validation import UpdateBounds, update_problem
from shared_model.config import OutputConfig, config_to_yaml, load_config
from shared_model.privacy import epsilon_for
from shared_model.weights import load_safetensors, save_safetensors

GLOBAL = [np.zeros((4, 3), np.float32), np.ones(5, np.float32)]
BOUNDS = UpdateBounds(max_update_norm=10.0, min_examples=1, max_examples=1000)


@pytest.mark.parametrize("arrays, examples, fragment", [
    ([np.full((4, 3), np.nan, np.float32), np.ones(5, np.float32)], 10, "non-finite"),
    ([np.zeros((3, 3), np.float32), np.ones(5, np.float32)], 10, "shape"),
    ([np.zeros((4, 3), np.float64), np.ones(5, np.float32)], 10, "dtype"),
    ([np.zeros((4, 3), np.float32)], 10, "1 arrays instead of 2"),
    ([np.full((4, 3), 100.0, np.float32), np.ones(5, np.float32)], 10, "update norm"),
    ([np.zeros((4, 3), np.float32), np.ones(5, np.float32)], 0, "num_examples"),
    ([np.zeros((4, 3), np.float32), np.ones(5, np.float32)], -3, "num_examples"),
    ([np.zeros((4, 3), np.float32), np.ones(5, np.float32)], 1001, "num_examples"),
    ([np.zeros((4, 3), np.float32), np.ones(5, np.float32), np.ones(2, np.float32)], 10,
     "3 arrays instead of 2"),
    ([np.zeros((4, 3), np.float32), np.full(5, np.inf, np.float32)], 10, "non-finite"),
])
@pytest.mark.reliability(5)
def test_bad_updates_are_named(arrays, examples, fragment) -> None:
    assert fragment in update_problem(arrays, examples, GLOBAL, BOUNDS)


@pytest.mark.reliability(5)
def test_good_update_passes() -> None:
    good = [np.full((4, 3), 0.5, np.float32), np.ones(5, np.float32)]
    assert update_problem(good, 10, GLOBAL, BOUNDS) is None


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


def _fit_res(arrays: list[np.ndarray], site: int, examples: int = 10) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), examples, {"site_index": site})


def _strategy(records: list, overrides: list[str] = ()):
    cfg = load_config("demo-cpu", ["federation.min_sites=3", "federation.secagg.mode=never",
                                   "federation.max_update_norm=10", *overrides])
    inner = build_aggregator(cfg, GLOBAL, lambda items: {}, evaluate=False)
    rounds: list[int] = []
    strategy = PhaseStrategy(cfg, PhaseInfo("pretrain", "", 3, "pretrain", 0, 0), inner, list(GLOBAL),
                             PrivacyLedger(1e-5), lambda r, a: rounds.append(r), records.append, False)
    return strategy, rounds


@pytest.mark.reliability(5)
def test_strategy_excludes_bad_replies_and_keeps_a_finite_model() -> None:
    records: list = []
    strategy, rounds = _strategy(records)
    good = [np.full((4, 3), 0.5, np.float32), np.ones(5, np.float32)]
    replies = [(_Proxy(1), _fit_res(good, 0)),
               (_Proxy(2), _fit_res([np.full((4, 3), np.nan, np.float32), good[1]], 1)),
               (_Proxy(3), _fit_res([np.zeros((2, 2), np.float32), good[1]], 2)),
               (_Proxy(4), _fit_res([np.full((4, 3), 1e3, np.float32), good[1]], 3)),
               (_Proxy(5), _fit_res([np.full((4, 3), 1.5, np.float32), good[1]], 4))]
    params, _ = strategy.aggregate_fit(1, replies, [])
    merged = parameters_to_ndarrays(params)
    assert np.allclose(merged[0], 1.0) and all(np.isfinite(a).all() for a in merged)
    assert set(records[-1].excluded) == {"site-1", "site-2", "site-3"}
    assert records[-1].status == RoundStatus.aggregated and rounds == [1]


@pytest.mark.reliability(5)
def test_too_few_valid_replies_keep_the_global_model() -> None:
    records: list = []
    strategy, rounds = _strategy(records)
    bad = [np.full((4, 3), np.nan, np.float32), np.ones(5, np.float32)]
    good = [np.full((4, 3), 0.5, np.float32), np.ones(5, np.float32)]
    params, _ = strategy.aggregate_fit(1, [(_Proxy(1), _fit_res(good, 0)), (_Proxy(2), _fit_res(bad, 1))], [])
    assert params is None and records[-1].status == RoundStatus.skipped
    assert all(np.array_equal(a, b) for a, b in zip(strategy.current, GLOBAL))
    assert rounds == [1]  # a skipped round is still checkpointed


def test_user_dp_noise_and_ledger() -> None:
    records: list = []
    strategy, _ = _strategy(records, ["privacy.mode=user", "privacy.noise_multiplier=1.0",
                                      "privacy.update_clip_norm=0.1"])
    good = [np.full((4, 3), 0.5, np.float32), np.ones(5, np.float32)]
    params, _ = strategy.aggregate_fit(1, [(_Proxy(i), _fit_res(good, i)) for i in range(3)], [])
    noisy = parameters_to_ndarrays(params)[0]
    assert noisy.dtype == np.float32 and 0.005 < float(np.std(noisy - 0.5)) < 0.08  # std = 0.1/3
    assert strategy.ledger.epsilon("all-sites", "user") == pytest.approx(epsilon_for([[1.0, 1.0, 1]], 1e-5))


@pytest.mark.reliability(10)
def test_budget_halts_before_the_round() -> None:
    strategy, _ = _strategy([], ["privacy.mode=user", "privacy.noise_multiplier=0.5",
                                 "privacy.epsilon_budget=0.5"])
    assert strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), client_manager=None) == []
    assert "privacy.epsilon_budget=0.5" in str(strategy.halt)


@pytest.mark.reliability(10)
def test_ledger_composes_and_round_trips() -> None:
    ledger = PrivacyLedger(1e-5, "rdp")
    for r in (1, 2):
        ledger.record("site-0", LedgerEntry(r, "pretrain", "sample", 1.1, 0.05, 20))
    ledger.record("all-sites", LedgerEntry(1, "pretrain", "user", 2.0, 1.0, 1))
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.epsilon("site-0", "sample") == pytest.approx(epsilon_for([[1.1, 0.05, 40]], 1e-5, "rdp"))
    assert again.summary() == ledger.summary() and set(again.summary()) == {"site-0", "all-sites"}
    planned = {"site-0": [LedgerEntry(3, "pretrain", "sample", 1.1, 0.05, 20)]}
    assert ledger.first_site_over(0.01, planned)[0] == "site-0"
    assert ledger.first_site_over(1e9, planned) is None


def _state() -> ServerState:
    rng = np.random.default_rng(0)
    return ServerState(global_round=3, phase="pretrain", phase_round=3, phase_keys=["a", "b"],
                       phase_arrays=[rng.normal(size=(3, 2)).astype(np.float32), np.ones(4, np.float32)],
                       foundation={"w": torch.ones(2)}, optimizer={"m_t": [np.zeros(2, np.float32)]},
                       ledger_json=PrivacyLedger(1e-5).to_json(), phases_done=[])


@pytest.mark.reliability(12)
def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    cfg = load_config("demo-cpu", [f"output.dir={tmp_path}"])
    state = _state()
    path = save_state(tmp_path, state, cfg)
    loaded = load_state(tmp_path, cfg)
    assert weights_hash(loaded.phase_arrays) == weights_hash(state.phase_arrays)
    assert loaded.global_round == 3 and torch.equal(loaded.foundation["w"], torch.ones(2))
    # Another run's config is refused ...
    with pytest.raises(ResumeError, match="another config"):
        load_state(tmp_path, load_config("demo-cpu", ["ssl.lr=0.5"]))
    # ... and so is a truncated file.
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ResumeError, match="damaged"):
        load_state(tmp_path, cfg)
    with pytest.raises(ResumeError, match="no checkpoint"):
        load_state(tmp_path / "elsewhere", cfg)


def _rewrite_checkpoint(path: Path, edit) -> None:
    tensors, raw = load_safetensors(path)
    meta = json.loads(raw["fedcmr"])
    edit(tensors, meta)
    save_safetensors(path, tensors, {"fedcmr": json.dumps(meta)})


@pytest.mark.parametrize("edit, fragment", [
    (lambda t, m: m.pop("phase_keys"), "'phase_keys'"),
    (lambda t, m: m.pop("global_round"), "'global_round'"),
    (lambda t, m: m.update(optimizer=None), "'optimizer'"),
    (lambda t, m: t.pop("opt/m_t/0"), "'opt/m_t/0'"),
    (lambda t, m: m.update(ledger='{"delta": 1e-05, "accountant": "prv"}'), "'entries'"),
])
@pytest.mark.reliability(12)
def test_checkpoint_missing_fields_are_named_not_key_errors(tmp_path: Path, edit, fragment) -> None:
    # Prepare: a good checkpoint with one field or tensor removed
    cfg = load_config("demo-cpu", [f"output.dir={tmp_path}"])
    path = save_state(tmp_path, _state(), cfg)
    _rewrite_checkpoint(path, edit)

    # Execute / Assert: a ResumeError naming the file and the field
    with pytest.raises(ResumeError, match=fragment) as caught:
        load_state(tmp_path, cfg)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text, fragment", [
    ('{"delta": 1e-05, "accountant": "prv"}', "'entries'"),
    ('{"delta": 1e-05, "accountant": "prv", "entries": {"s": [{"round": 1}]}}', "entries.s"),
    ("[]", "JSON object"),
])
def test_damaged_ledger_text_names_the_field(text: str, fragment: str) -> None:
    with pytest.raises(LedgerError, match=fragment):
        PrivacyLedger.from_json(text)


@pytest.mark.parametrize("name, text", [
    ("status.json", "{not json"), ("status.json", '{"detail": "x"}'),
    ("metrics.json", "[1, 2"), ("metrics.json", '[{"round": 1}]'),
])
def test_status_of_a_run_with_damaged_files_is_one_line_and_exit_2(tmp_path: Path, name: str,
                                                                     text: str) -> None:
    # Prepare
    (tmp_path / name).write_text(text)

    # Execute
    result = CliRunner().invoke(server_cli.app, ["status", str(tmp_path)])

    # Assert: exit 2, the file named, no traceback
    assert result.exit_code == 2, result.output
    assert name in result.output and "Traceback" not in result.output


def test_server_optimizer_state_is_restored() -> None:
    cfg = load_config("demo-cpu", ["federation.min_sites=2", "federation.aggregator=fedadam"])
    inner = build_aggregator(cfg, GLOBAL, lambda items: {}, evaluate=False)
    replies = [(_Proxy(1), _fit_res([a + 1 for a in GLOBAL], 0)), (_Proxy(2), _fit_res([a + 2 for a in GLOBAL], 1))]
    first, _ = inner.aggregate_fit(1, replies, [])
    saved = optimizer_state(inner)
    assert set(saved) == {"m_t", "v_t"}
    fresh = build_aggregator(cfg, GLOBAL, lambda items: {}, evaluate=False)
    restore_optimizer_state(fresh, saved, parameters_to_ndarrays(first))
    a, _ = inner.aggregate_fit(2, replies, [])
    b, _ = fresh.aggregate_fit(2, replies, [])
    assert all(np.allclose(x, y) for x, y in zip(parameters_to_ndarrays(a), parameters_to_ndarrays(b)))


@pytest.mark.reliability(9)
def test_node_guard_refuses_weak_secagg_and_contradictory_unmask() -> None:
    policy = NodePolicy(min_secagg_threshold=3, min_secagg_shares=4)
    with pytest.raises(NodePolicyError, match="below this node's policy"):
        check_secagg_request({"stage": "setup", "threshold": 2, "share_num": 4}, policy)
    check_secagg_request({"stage": "setup", "threshold": 3, "share_num": 4}, policy)
    with pytest.raises(NodePolicyError, match="both as active and as dropped"):
        check_secagg_request({"stage": "unmask", "active_nids": [1, 2], "dead_nids": [2]}, policy)
    check_secagg_request({"stage": "unmask", "active_nids": [1, 2], "dead_nids": [3]}, policy)


@pytest.mark.reliability(16)
def test_node_failures_leave_as_their_type_only_and_refusals_with_their_message(monkeypatch) -> None:
    # Arrange: a failure whose text carries a local path, and a policy refusal
    from flwr.app import Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import redact_errors

    for field, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)  # a node process knows its run

    msg = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")

    def leaky(message, context):
        raise FileNotFoundError("/data/Doe^John_1970/series 12/IM0001 not found")

    def refuses(message, context):
        raise NodePolicyError("SecAgg+ with threshold 1 and 2 shares is below this node's policy")

    # Act
    leaked = redact_errors(msg, None, leaky)
    refused = redact_errors(msg, None, refuses)

    # Assert: the server learns the type, never the text; the node's own refusal keeps its words
    assert leaked.has_error() and "Doe" not in leaked.error.reason and "/data" not in leaked.error.reason
    assert leaked.error.reason.startswith("FileNotFoundError")
    assert refused.has_error() and "below this node's policy" in refused.error.reason


@pytest.mark.reliability(16)
def test_server_keeps_only_allow_listed_scalar_metrics_from_nodes() -> None:
    from server.strategy import _keep_allowed_metrics

    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(GLOBAL), 10,
                 {"loss_mean": 0.5, "site_index": 1, "PatientName": "Doe^John", "note": "x"})
    _keep_allowed_metrics([(None, res)])
    assert res.metrics == {"loss_mean": 0.5, "site_index": 1}


class _OneReplyGrid:
    """A grid on which only the first addressed site answers (the other stays silent)."""

    def __init__(self, reply: Callable[[Message], Message]) -> None:
        self.reply = reply

    def send_and_receive(self, messages, timeout):
        return [self.reply(list(messages)[0])]


@pytest.mark.parametrize("kind", ["fit", "evaluate"])
@pytest.mark.reliability(11)
def test_a_silent_site_counts_as_a_timeout_in_fit_and_evaluate_rounds(monkeypatch, kind: str) -> None:
    # Prepare: two sites asked, one answers OK
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app.message_type import MessageType
    from flwr.common import EvaluateIns, EvaluateRes, FitIns
    from flwr.supercore.task_identity import TaskIdentity

    from server.workflows import send_and_collect

    for field, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)
    params = ndarrays_to_parameters(GLOBAL)
    if kind == "fit":
        ins, message_type = FitIns(params, {}), MessageType.TRAIN
        to_content, from_content = (lambda i: compat.fitins_to_recorddict(i, True),
                                    lambda c: compat.recorddict_to_fitres(c, False))
        answer = compat.fitres_to_recorddict(_fit_res(GLOBAL, 0), True)
    else:
        ins, message_type = EvaluateIns(params, {}), MessageType.EVALUATE
        to_content, from_content = (lambda i: compat.evaluateins_to_recorddict(i, True),
                                    compat.recorddict_to_evaluateres)
        answer = compat.evaluateres_to_recorddict(EvaluateRes(Status(Code.OK, ""), 0.5, 10, {}))
    grid = _OneReplyGrid(lambda msg: Message(answer, reply_to=msg))

    # Execute
    results, failures = send_and_collect(grid, [(_Proxy(1), ins), (_Proxy(2), ins)], message_type,
                                         server_round=1, timeout_s=5.0, to_content=to_content,
                                         from_content=from_content)

    # Assert: the answer is a result, the silent site one timeout failure
    assert [proxy.node_id for proxy, _ in results] == [1]
    assert [type(f).__name__ for f in failures] == ["TimeoutError"]
    assert "no reply within 5 s" in str(failures[0])


@pytest.mark.reliability(7)
def test_a_halted_secagg_round_is_recorded_and_the_model_stays() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from server.app import counting_halts

    # Prepare: a fit step that ends without aggregating (as SecAgg+ does when it halts)
    records: list = []
    strategy, rounds = _strategy(records)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), config=ServerConfig(num_rounds=3), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 2})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, np.float32)])

    # Execute
    counting_halts(lambda grid, ctx: None, strategy)(None, context)

    # Assert
    assert [r.status for r in records] == [RoundStatus.halted] and rounds == [2]
    assert all(np.array_equal(a, b) for a, b in zip(strategy.current, GLOBAL, strict=True))

    # Execute: a fit step that aggregates is recorded once, as aggregated
    replies = [(_Proxy(i), _fit_res([a + 0.1 for a in GLOBAL], i)) for i in range(3)]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 3})
    counting_halts(lambda grid, ctx: strategy.aggregate_fit(3, replies, []), strategy)(None, context)

    # Assert
    assert [r.status for r in records] == [RoundStatus.halted, RoundStatus.aggregated] and rounds == [2, 3]

    # Execute: a round after the phase stopped (paused) sends nothing and is no halted round
    strategy.halt = RuntimeError("paused after round 3")
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 4})
    counting_halts(lambda grid, ctx: None, strategy)(None, context)

    # Assert
    assert len(records) == 2 and rounds == [2, 3]


def test_export_writes_the_release_of_a_run(tmp_path: Path) -> None:
    from server.release import export_release

    # Prepare: a checkpoint of a finished pretraining (a real run's state, written here)
    from server.ledger import PrivacyLedger as Ledger
    from server.state import ServerState as State
    from shared_model.config import save_resolved_config
    from shared_model.encoders import build_encoder

    cfg = load_config("demo-cpu", [f"output.dir={tmp_path / 'run'}"])
    save_resolved_config(cfg, tmp_path / "run")
    torch.manual_seed(0)
    encoder = {k: v.clone() for k, v in build_encoder(cfg.model.preset).state_dict().items()}
    save_state(tmp_path / "run", State(global_round=2, foundation=encoder,
                                       ledger_json=Ledger(1e-5).to_json()), cfg)

    # Execute
    out = export_release(tmp_path / "run", tmp_path / "bundle")

    # Assert
    assert {p.name for p in out.iterdir()} >= {"encoder.safetensors", "config.yaml", "model_card.md"}
    assert torch.equal(load_safetensors(out / "encoder.safetensors")[0]["pos_embed"], encoder["pos_embed"])
    assert not list(tmp_path.glob(".*staging*"))


@pytest.mark.reliability(7)
def test_a_secagg_aggregate_is_decoded_onto_the_global_model_or_refused() -> None:
    from shared_model.wire import UPDATE_NORM_KEY, UPDATE_SCALE_KEY

    # Prepare: a SecAgg+ strategy; every result carries the same unmasked mean update
    records: list = []
    strategy, rounds = _strategy(records, ["federation.secagg.mode=always",
                                           "federation.secagg.max_weight_change=0.5"])
    scale = strategy.update_scale
    mean = [np.full((4, 3), 0.2 / scale, np.float32), np.zeros(5, np.float32)]

    # Execute
    params, _ = strategy.aggregate_fit(1, [(_Proxy(i), _fit_res(mean, i)) for i in range(3)], [])

    # Assert: the plan carried the scale and bound, the new global is global + scale * mean
    assert scale == pytest.approx(0.5 / 8.0)
    merged = parameters_to_ndarrays(params)
    assert np.allclose(merged[0], 0.2) and np.allclose(merged[1], 1.0)
    assert records[-1].status == RoundStatus.aggregated

    # Execute: an aggregate past the norm bound (10 here: sites that did not clip) and one
    # holding NaN
    for bad in ([np.full((4, 3), 400.0, np.float32), np.zeros(5, np.float32)],
                [np.full((4, 3), np.nan, np.float32), np.zeros(5, np.float32)]):
        before = [a.copy() for a in strategy.current]
        params, _ = strategy.aggregate_fit(2, [(_Proxy(i), _fit_res(bad, i)) for i in range(3)], [])

        # Assert: refused, recorded, the model unchanged
        assert params is None and records[-1].status == RoundStatus.skipped
        assert "secagg-aggregate" in records[-1].excluded
        assert all(np.array_equal(a, b) for a, b in zip(strategy.current, before, strict=True))

    # Execute: the next round's instructions
    from flwr.server.client_manager import SimpleClientManager
    manager = SimpleClientManager()
    for i in range(3):
        manager.register(_Proxy(i))
    instructions = strategy.configure_fit(3, ndarrays_to_parameters(strategy.current), manager)

    # Assert: every site is told the scale and the norm bound its update must keep
    assert len(instructions) == 3
    assert all(ins.config[UPDATE_SCALE_KEY] == scale and ins.config[UPDATE_NORM_KEY] == 10.0
               for _, ins in instructions)


@pytest.mark.reliability(11)
def test_too_few_sites_halt_the_round_in_bounded_time_and_keep_the_model() -> None:
    # Prepare: a round that needs 3 sites, 2 connected, a 0.2 s wait (Flower's own: 24 h)
    import time

    from server.strategy import TooFewSites
    from server.workflows import BoundedClientManager

    records: list = []
    strategy, rounds = _strategy(records, ["federation.site_wait_s=0.2"])
    manager = BoundedClientManager(strategy.cfg.federation.site_wait_s)
    for node in (1, 2):
        manager.register(_Proxy(node))
    # Execute
    started = time.monotonic()
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), manager)
    waited = time.monotonic() - started
    # Check: no instructions after the bounded wait (not a day), the round recorded as halted
    # with the reason, checkpointed, the model unchanged and the run paused (resumable)
    assert instructions == [] and waited < 60
    assert records[-1].status == RoundStatus.halted and "2 of the 3 sites" in records[-1].excluded["sites"]
    assert rounds == [1]
    assert all(np.array_equal(a, b) for a, b in zip(strategy.current, GLOBAL, strict=True))
    assert isinstance(strategy.halt, TooFewSites) and "output.resume=true" in str(strategy.halt)
    # a third node in time: the next run of the round has all three
    manager.register(_Proxy(3))
    strategy.halt = None
    assert len(strategy.configure_fit(2, ndarrays_to_parameters(GLOBAL), manager)) == 3


@pytest.mark.reliability(14)
def test_an_oversized_update_is_refused_undecoded_and_the_round_goes_on(monkeypatch) -> None:
    # Prepare: 3 honest sites and one whose reply carries an extra 8 MB array
    import server.strategy as strategy_module
    from server.validation import size_limit_bytes

    records: list = []
    strategy, rounds = _strategy(records)
    good = [np.full((4, 3), 0.5, np.float32), np.ones(5, np.float32)]
    huge = [*good, np.zeros(2 * 1024 * 1024, np.float32)]
    replies = [(_Proxy(i), _fit_res(good, i)) for i in range(3)] + [(_Proxy(3), _fit_res(huge, 3))]
    decoded: list[int] = []
    real = strategy_module.parameters_to_ndarrays

    def counting(parameters):
        decoded.append(sum(len(t) for t in parameters.tensors))
        return real(parameters)

    monkeypatch.setattr(strategy_module, "parameters_to_ndarrays", counting)
    # Execute
    params, _ = strategy.aggregate_fit(1, replies, [])
    # Check: the big reply is excluded by size before any decoding, the others aggregate
    assert "exceeds the limit" in records[-1].excluded["site-3"]
    assert max(decoded) < size_limit_bytes(None, GLOBAL)
    assert records[-1].status == RoundStatus.aggregated and rounds == [1]
    assert np.allclose(parameters_to_ndarrays(params)[0], 0.5)
    # an explicit limit in MB
    assert size_limit_bytes(2.0, GLOBAL) == 2 * 1024 * 1024


@pytest.mark.parametrize("ssl_head", ["auto", "aggregated", "local"])
def test_a_dense_decoder_is_released_only_when_it_was_aggregated(ssl_head: str) -> None:
    from server.app import PRETRAIN, _finish_phase, phase_model, plan_phases

    # Prepare: the pretraining phase's dense MAE and the keys it federates
    cfg = load_config("demo-cpu", ["model.preset=vit-tiny-p8-64", "ssl.mae.decoder=dense",
                                   f"federation.ssl_head={ssl_head}"])
    state = ServerState()
    model, keys = phase_model(cfg, plan_phases(cfg)[0], state)

    # Execute
    _finish_phase(PhaseInfo(PRETRAIN, "", 1, PRETRAIN, 0, 0), model, state, keys)

    # Assert: the encoder always; the decoder only when the sites' decoders were averaged (a
    # local one's server copy is its untrained initial state)
    assert state.foundation and PRETRAIN in state.phases_done
    assert bool(state.decoder) == (ssl_head != "local")  # auto aggregates a dense decoder
    assert any(k.startswith("head.") for k in keys) == (ssl_head != "local")



def test_config_fingerprint_is_the_hash_of_its_yaml_however_often_asked() -> None:
    # Prepare: what earlier checkpoints hold (the YAML hash of everything but output)
    cfg = load_config("demo-cpu", ["seed=5"])
    written = config_to_yaml(dataclasses.replace(cfg, output=OutputConfig()))
    expected = hashlib.sha256(written.encode()).hexdigest()[:16]

    # Execute / Assert: the same value every round; another config differs; output does not count
    assert config_fingerprint(cfg) == expected == config_fingerprint(cfg)
    assert config_fingerprint(load_config("demo-cpu", ["seed=6"])) != expected
    assert config_fingerprint(load_config("demo-cpu", ["seed=5", "output.dir=/elsewhere"])) == expected
