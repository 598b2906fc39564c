"""The node's audit log: one JSON line per reply, with what it carries; unloggable replies stay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from client.audit import audit_mod

NODE = 5


def _instruction() -> Message:
    return Message(RecordDict({}), dst_node_id=NODE, message_type=MessageType.TRAIN, group_id="3")


def _context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def _replying(content: RecordDict | Error):
    def call_next(msg: Message, context: Context) -> Message:
        return Message(content, reply_to=msg)
    return call_next


def test_each_reply_is_logged_with_what_it_carries(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a node process (run 1) answering two instructions
    for field, value in (("_run_id", 1), ("_node_id", NODE), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)
    log = tmp_path / "node-state" / "node-audit.jsonl"
    mod = audit_mod(lambda context: log)
    weights = ArrayRecord([np.zeros((4, 3), np.float32), np.ones(5, np.float32)])
    content = RecordDict({"fitres.parameters": weights,
                          "fitres.metrics": MetricRecord({"loss": 0.25, "site_index": 2}),
                          "evaluateres.metrics": MetricRecord({"loss": float("nan")}),
                          "secagg": ConfigRecord({"stage": "share_keys", "pk": b"x" * 32,
                                                  "shares": [b"a" * 10, b"b" * 10]})})
    # Execute
    first = mod(_instruction(), _context(), _replying(content))
    refused = mod(_instruction(), _context(), _replying(Error(code=0, reason="NodePolicyError: too weak")))
    # Check: both replies go out, each logged as one line, appended
    assert first.has_content() and refused.has_error()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2
    sent = lines[0]
    assert sent["run"] == 1 and sent["round"] == "3" and sent["message_type"] == MessageType.TRAIN
    assert [a["shape"] for a in sent["arrays"]] == [[4, 3], [5]] and sent["bytes"] >= 68
    assert sent["metrics"]["fitres.metrics"] == {"loss": 0.25, "site_index": 2}
    assert sent["metrics"]["evaluateres.metrics"] == {"loss": "nan"}  # logged, not withheld
    # keys and shares are logged by size, never by content
    assert sent["configs"]["secagg"]["pk"] == {"bytes": 32}
    assert sent["configs"]["secagg"]["shares"] == {"items": 2, "bytes": 20}
    assert "x" * 32 not in log.read_text()
    assert lines[1]["error"]["reason"] == "NodePolicyError: too weak"


def test_a_reply_that_cannot_be_logged_is_withheld(tmp_path: Path, monkeypatch) -> None:
    for field, value in (("_run_id", 1), ("_node_id", NODE), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    mod = audit_mod(lambda context: blocked / "node-audit.jsonl")
    content = RecordDict({"w": ArrayRecord([np.zeros(3, np.float32)])})
    reply = mod(_instruction(), _context(), _replying(content))
    assert reply.has_error() and "AuditLogError" in reply.error.reason
