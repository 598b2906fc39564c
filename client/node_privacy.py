"""The node's own privacy accountant: every DP-SGD round it trained, kept in its state folder.

The server's ledger counts a run's rounds; the node counts everything its data went into, over
runs and restarts: one row per DP round ``[noise multiplier, sample rate, steps]`` (Opacus'
accountant history) in ``<node state>/privacy-accountant.json``, written atomically after each
round. With a budget (node config ``max-epsilon``, at the node's ``privacy-delta``), a round
whose planned steps would take the node past it is refused before it trains, whatever the
server's plan or ledger says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client.node_settings import NodePolicyError
from shared_model.errors import UserError
from shared_model.files import atomic_write_text, read_json
from shared_model.privacy import epsilon_for, history_rows

ACCOUNTANT_FILE = "privacy-accountant.json"
FORMAT = "fedcmr-node-accountant"


class NodeAccountantError(UserError, ValueError):
    """The node's accountant file is damaged; the node will not guess its privacy loss."""


@dataclass
class NodeAccountant:
    path: Path
    accountant: str = "prv"

    def history(self) -> list[list[float]]:
        if not self.path.is_file():
            return []
        data = read_json(self.path, NodeAccountantError,
                         "restore it from the node's backup; without it the node cannot know "
                         "how much privacy its data has already spent")
        rows = history_rows(data.get("history")) if isinstance(data, dict) and data.get("format") == FORMAT else None
        if rows is None:
            raise NodeAccountantError(f"{self.path}: field 'history' is not a list of [noise, rate, "
                                      "steps] rows; restore the file from the node's backup")
        return rows

    def epsilon(self, delta: float, extra: list[list[float]] | None = None) -> float:
        return epsilon_for(self.history() + (extra or []), delta, self.accountant)

    def check(self, noise: float, sample_rate: float, steps: int, max_epsilon: float,
              delta: float) -> None:
        """Refuse a round that would take the node past ``max_epsilon`` (0: no budget)."""
        if max_epsilon <= 0:
            return
        eps = self.epsilon(delta, [[noise, sample_rate, steps]])
        if eps > max_epsilon:
            raise NodePolicyError(f"this round would take the node's own epsilon to {eps:.3g} "
                                  f"(delta {delta:g}), over its budget max-epsilon={max_epsilon:g}; "
                                  "the node does not train it")

    def record(self, noise: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        rows = self.history() + [[float(noise), float(sample_rate), int(steps)]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "history": rows}, indent=1))
