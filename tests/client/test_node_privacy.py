"""The node's own accountant: it survives a restart and refuses a round over the node's budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.node_privacy import NodeAccountant, NodeAccountantError
from client.node_settings import NodePolicyError
from shared_model.privacy import epsilon_for


@pytest.mark.reliability(10)
def test_the_node_keeps_its_epsilon_across_restarts_and_refuses_past_its_budget(tmp_path: Path) -> None:
    # Prepare: a node trained two DP rounds (recorded by one process)
    path = tmp_path / "node-state" / "privacy-accountant.json"
    NodeAccountant(path).record(1.0, 0.1, 40)
    NodeAccountant(path).record(1.0, 0.1, 40)
    # Execute: a restarted node reads them back
    restarted = NodeAccountant(path)
    spent = restarted.epsilon(1e-5)
    # Check: the same epsilon as the two rounds composed; a round within the budget passes,
    # one past it is refused before training, naming the budget
    assert spent == pytest.approx(epsilon_for([[1.0, 0.1, 40], [1.0, 0.1, 40]], 1e-5))
    restarted.check(1.0, 0.1, 40, max_epsilon=spent * 10, delta=1e-5)
    with pytest.raises(NodePolicyError, match="max-epsilon"):
        restarted.check(1.0, 0.1, 400, max_epsilon=spent * 1.2, delta=1e-5)
    restarted.check(1.0, 0.1, 10**6, max_epsilon=0.0, delta=1e-5)  # no budget set


def test_a_damaged_accountant_is_refused_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "privacy-accountant.json"
    path.write_text("{not json")
    with pytest.raises(NodeAccountantError, match="backup"):
        NodeAccountant(path).history()
    path.write_text(json.dumps({"format": "fedcmr-node-accountant", "history": [[1.0, "x", 3]]}))
    with pytest.raises(NodeAccountantError, match="'history'"):
        NodeAccountant(path).check(1.0, 0.1, 1, max_epsilon=1.0, delta=1e-5)
