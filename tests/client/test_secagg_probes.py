"""Malicious-server probes at the node (reliability check 9): each is refused before the node
sends anything it should not, by the node's guard or by Flower's SecAgg+ state machine."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.app import NodePolicy, NodePolicyError, check_secagg_request, node_guard, secure_aggregation

NODE = 7
SETUP = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
         Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 4194304, Key.MOD_RANGE: 4294967296,
         Key.MAX_WEIGHT: 1000.0}


@pytest.fixture(autouse=True)
def _node_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in (("_run_id", 1), ("_node_id", NODE), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)  # a node process knows its run


def _message(configs: dict | None) -> Message:
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)} if configs is not None else {})
    return Message(content, dst_node_id=NODE, message_type=MessageType.TRAIN, group_id="1")


def _context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def _never_called(msg: Message, context: Context) -> Message:
    raise AssertionError("the node trained for a probe it should refuse")


@pytest.mark.reliability(9)
def test_a_plaintext_round_is_refused_where_secagg_is_required() -> None:
    guard = node_guard(NodePolicy(require_secagg=True))
    with pytest.raises(NodePolicyError, match="only under SecAgg"):
        guard(_message(None), _context(), _never_called)


@pytest.mark.reliability(9)
@pytest.mark.parametrize("threshold, shares, fragment", [
    (2, 4, "at most half"),  # the server could learn both masks of a site
    (1, 3, "below this node's policy"),
])
def test_a_threshold_at_most_half_the_shares_or_below_policy_is_refused(threshold, shares, fragment) -> None:
    with pytest.raises(NodePolicyError, match=fragment):
        check_secagg_request({"stage": "setup", "threshold": threshold, "share_num": shares},
                             NodePolicy(min_secagg_threshold=2, min_secagg_shares=3))


@pytest.mark.reliability(9)
def test_stages_out_of_order_abort_the_protocol() -> None:
    with pytest.raises(ValueError, match="Abort secure aggregation"):
        secure_aggregation(_message({Key.STAGE: Stage.COLLECT_MASKED_VECTORS}), _context(), _never_called)


@pytest.mark.reliability(9)
def test_duplicate_public_keys_abort_the_protocol() -> None:
    # Prepare: the node's own keys from a proper setup stage
    context = _context()
    reply = secure_aggregation(_message(dict(SETUP)), context, _never_called)
    own = reply.content.config_records[RECORD_KEY_CONFIGS]
    keys = [own[Key.PUBLIC_KEY_1], own[Key.PUBLIC_KEY_2]]

    # Execute / Assert: two other "nodes" announced with the same keys
    other = [b"\x01" * 44, b"\x02" * 44]
    share = {Key.STAGE: Stage.SHARE_KEYS, str(NODE): keys, "8": other, "9": other}
    with pytest.raises(ValueError, match="identical"):
        secure_aggregation(_message(share), context, _never_called)


@pytest.mark.reliability(9)
def test_the_server_never_plans_a_threshold_its_nodes_refuse() -> None:
    from shared_model.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reconstruction_threshold"):
        load_config("demo-cpu", ["federation.secagg.num_shares=4",
                                 "federation.secagg.reconstruction_threshold=2"])


@pytest.mark.reliability(9)
@pytest.mark.parametrize("overrides, fragment", [
    (["privacy.mode=none"], "privacy.mode is 'none'"),
    (["privacy.mode=user", "privacy.noise_multiplier=2.0"], "privacy.mode is 'user'"),
    (["privacy.mode=sample", "ssl.mae.decoder=dense", "privacy.noise_multiplier=0.5"], "below this node's minimum 1"),
])
def test_a_plan_with_less_noise_than_the_node_requires_is_refused_before_training(
        tmp_path, overrides: list[str], fragment: str) -> None:
    # Prepare: a node that requires DP-SGD noise >= 1.0 (node_config min-noise-multiplier)
    from client.federated import FedCMRClient
    from client.node_settings import _policy
    from shared_model.config import config_to_yaml, load_config
    from shared_model.wire import PLAN_KEY

    policy = _policy({"min-noise-multiplier": "1.0"})
    node = FedCMRClient(tmp_path / "no-store-needed", "cpu", 0, _context(), policy)
    plan = config_to_yaml(load_config("demo-cpu", overrides))
    # Execute / Check: refused from the plan alone (no store opened, nothing trained)
    with pytest.raises(NodePolicyError, match=fragment):
        node.fit([], {PLAN_KEY: plan})
    # a plan with enough noise passes the check (and only then reaches the store)
    enough = config_to_yaml(load_config("demo-cpu", ["privacy.mode=sample", "ssl.mae.decoder=dense",
                                                          "privacy.noise_multiplier=1.2"]))
    with pytest.raises(Exception) as after:
        node.fit([], {PLAN_KEY: enough})
    assert not isinstance(after.value, NodePolicyError)


@pytest.mark.reliability(14)
def test_an_instruction_or_a_reply_above_the_nodes_message_size_is_refused() -> None:
    # Prepare: a node that processes and sends at most 1 MB
    import numpy as np
    from flwr.app import ArrayRecord

    from client.node_settings import node_settings_from_context

    node = Context(run_id=1, node_id=NODE, node_config={"store": "/data/store", "max-message-mb": 1.0},
                   state=RecordDict(), run_config={})
    guard = node_guard(node_settings_from_context(node).policy)
    big = ArrayRecord([np.zeros(300_000, np.float32)])  # 1.2 MB
    small = ArrayRecord([np.zeros(1_000, np.float32)])

    def instruction(arrays: ArrayRecord) -> Message:
        return Message(RecordDict({"fitins.parameters": arrays}), dst_node_id=NODE,
                       message_type=MessageType.TRAIN, group_id="1")

    def replying(arrays: ArrayRecord):
        return lambda msg, context: Message(RecordDict({"fitres.parameters": arrays}), reply_to=msg)

    # Execute / Assert: too large an instruction is refused before any training
    with pytest.raises(NodePolicyError, match=r"an instruction of 1\.2 MB exceeds this node's limit of 1 MB"):
        guard(instruction(big), node, _never_called)
    # ... too large a reply is withheld (the error goes instead), one within the limit passes
    with pytest.raises(NodePolicyError, match=r"a reply of 1\.2 MB exceeds"):
        guard(instruction(small), node, replying(big))
    assert guard(instruction(small), node, replying(small)).has_content()
