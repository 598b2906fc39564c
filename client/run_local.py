"""What a node keeps between the rounds of one run, on its own disk.

Some weights never leave a node: an SSL head that stays local (``federation.ssl_head``), a DINO
local-EMA teacher, task heads under ``federation.heads=local``; and the run's own DP-SGD history
(the plan's ``privacy.epsilon_budget`` counts it). They are kept per run, per round, in
``<node state>/runs/<run>/r<round>.safetensors`` (one snapshot of all of them after each round
the node trained), so that a run that is paused, crashes or whose node restarts continues from
exactly what the node held after the round the server resumes from — a resumed run is the
uninterrupted one. ``<run>`` is the token the server draws when a run starts and keeps in its
checkpoint (``shared_model.wire.RUN_KEY``); a node that is not told one keys by Flower's run id
(kept only for that Flower run, as before a resume).

A round ``g`` starts from the newest snapshot of an earlier round (a snapshot of a round the
server never aggregated is ignored, and overwritten when that round is redone); the last
``KEEP`` snapshots of a run stay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared_model.errors import UserError
from shared_model.privacy import history_rows
from shared_model.weights import WeightsError, load_safetensors, save_safetensors

RUNS_DIR = "runs"
KEEP = 3
FORMAT = "fedcmr-run-local"
_TOKEN = re.compile(r"[0-9a-z][0-9a-z-]{0,63}")
_SNAPSHOT = re.compile(r"r(\d+)\.safetensors")


class RunLocalError(UserError, ValueError):
    """A run's local snapshot is damaged, or the server named the run with an unusable token."""


@dataclass
class Snapshot:
    """Groups of tensors (``"ssl_head"``, ``"teacher"``, ``"head/<task>"``) and the run's DP history."""

    groups: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    dp_history: list[list[float]] = field(default_factory=list)


class RunLocalState:
    def __init__(self, node_state: Path, token: str) -> None:
        if not _TOKEN.fullmatch(token):
            raise RunLocalError(f"the server named the run {token[:80]!r}; a run token is 1-64 "
                                "lower-case letters, digits and dashes")
        self.folder = node_state / RUNS_DIR / token

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _SNAPSHOT.fullmatch(p.name)))

    def load(self, upto_round: int) -> Snapshot:
        """The newest snapshot of a round <= ``upto_round`` (empty if there is none)."""
        rounds = [r for r in self._rounds() if r <= upto_round]
        if not rounds:
            return Snapshot()
        path = self.folder / f"r{rounds[-1]}.safetensors"
        hint = ("delete the run's folder to start its local weights afresh (the run then "
                "differs from an uninterrupted one), or restore it from the node's backup")
        try:
            tensors, meta = load_safetensors(path)
            info = json.loads(meta.get("fedcmr", "null"))
        except (WeightsError, json.JSONDecodeError) as exc:
            raise RunLocalError(f"{path}: {exc}; {hint}") from exc
        ours = isinstance(info, dict) and info.get("format") == FORMAT
        history = history_rows(info.get("dp_history")) if ours else None
        if history is None:
            raise RunLocalError(f"{path}: not a FedCMR run snapshot (metadata 'dp_history'); {hint}")
        snapshot = Snapshot(dp_history=history)
        for key, tensor in tensors.items():
            group, _, name = key.rpartition("/")
            snapshot.groups.setdefault(group, {})[name] = tensor
        return snapshot

    def save(self, round_: int, snapshot: Snapshot) -> Path:
        """Write the snapshot of round ``round_`` atomically; keep the newest ``KEEP``."""
        tensors = {f"{group}/{name}": t.detach().cpu().contiguous()
                   for group, weights in snapshot.groups.items() for name, t in weights.items()}
        path = save_safetensors(self.folder / f"r{round_}.safetensors", tensors,
                                {"fedcmr": json.dumps({"format": FORMAT, "round": round_,
                                                       "dp_history": snapshot.dp_history})})
        rounds = self._rounds()
        # snapshots of later rounds belong to rounds the server is redoing: they go too
        for old in [r for r in rounds if r > round_] + [r for r in rounds if r <= round_][:-KEEP]:
            (self.folder / f"r{old}.safetensors").unlink(missing_ok=True)
        return path
