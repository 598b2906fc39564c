"""The node's append-only audit log: what left the node, message by message.

One JSON line per message the node answers, written before the reply leaves: the time (UTC),
the run, the message type and round, and what the reply carries — every array's name, shape,
dtype and size in bytes, every metric's name and value, every config entry's name and kind (a
SecAgg+ stage sends public keys and secret shares as bytes: their sizes are logged, never their
contents) — or the public reason of a refusal. Nothing of the node's data is in it: it is
built from what the reply already holds, which the allow-list and the error redaction have
reduced to numbers, array shapes and setting names.

The log is opened in append mode and each line is flushed and fsynced. A reply that cannot be
logged does not leave: the node answers with an error instead (fail closed), so the log never
misses what was sent.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

log = logging.getLogger(__name__)
AUDIT_FILE = "node-audit.jsonl"


def _number(value: object) -> object:
    """JSON has no NaN or infinity: a non-finite number is logged as its name ("nan", "inf")."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _config_value(value: object) -> object:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        if value and isinstance(value[0], bytes):
            return {"items": len(value), "bytes": sum(len(v) for v in value)}
        return {"items": len(value)}
    return _number(value) if isinstance(value, (bool, int, float)) else {"kind": type(value).__name__}


def audit_record(msg: Message, reply: Message) -> dict[str, object]:
    """What ``reply`` (to ``msg``) takes off the node, as plain data."""
    record: dict[str, object] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "run": msg.metadata.run_id, "message_type": msg.metadata.message_type,
        "round": msg.metadata.group_id,
    }
    if reply.has_error():
        record["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        return record
    content = reply.content
    arrays = []
    for name, arrays_record in content.array_records.items():
        for key, array in arrays_record.items():
            arrays.append({"record": name, "array": key, "shape": list(array.shape),
                           "dtype": array.dtype, "bytes": len(array.data)})
    record["arrays"] = arrays
    record["bytes"] = sum(int(a["bytes"]) for a in arrays)  # type: ignore[call-overload]
    record["metrics"] = {name: {k: [_number(x) for x in v] if isinstance(v, list) else _number(v)
                                for k, v in metrics.items()}
                         for name, metrics in content.metric_records.items()}
    record["configs"] = {name: {k: _config_value(v) for k, v in configs.items()}
                         for name, configs in content.config_records.items()}
    return record


def append_line(path: Path, record: dict[str, object]) -> None:
    """Append one JSON line, flushed and fsynced (the file is never rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def audit_mod(path_for: Callable[[Context], Path]) -> Callable[
        [Message, Context, Callable[[Message, Context], Message]], Message]:
    """Outermost mod: log what each reply carries to ``path_for(context)``, then let it go."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        try:
            append_line(path_for(context), audit_record(msg, reply))
        except (OSError, ValueError) as error:
            log.error("the node's audit log cannot be written (%s); the reply is withheld", error)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason="AuditLogError: the node could not log its reply"),
                           reply_to=msg)
        return reply

    return mod
