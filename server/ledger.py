"""The privacy ledger: per site, (epsilon, delta) composed over every round and phase.

Two mechanisms, two units of privacy, kept apart:

- ``user``: site-level DP. Each round a site takes part in (sampled with rate ``q``), its update
  is clipped and the aggregate gets Gaussian noise of std ``noise_multiplier * clip / n``: one
  subsampled Gaussian step protecting the whole site's contribution.
- ``sample``: image-level DP-SGD at the node (Opacus); each round adds ``steps`` subsampled
  Gaussian steps with the node's sampling rate (reported by the node).

Epsilon comes from Opacus' accountants (PRV or RDP) over the recorded history, so it is exactly
reproducible from the ledger file alone, and identical after a resume. The budget is enforced
*before* a round: a round that would take any site past it is not started.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shared_model.errors import UserError
from shared_model.privacy import epsilon_for

MECHANISMS = ("user", "sample")


class LedgerError(UserError, ValueError):
    """A ledger text that cannot be read back; the message names the field."""


@dataclass
class LedgerEntry:
    round: int  # global round number across phases
    phase: str
    mechanism: str  # "user" | "sample"
    noise_multiplier: float
    sample_rate: float
    steps: int


_ENTRY_TYPES: dict[str, type | tuple[type, ...]] = {
    "round": int, "phase": str, "mechanism": str, "noise_multiplier": (int, float),
    "sample_rate": (int, float), "steps": int}


@dataclass
class PrivacyLedger:
    delta: float
    accountant: str = "prv"
    entries: dict[str, list[LedgerEntry]] = field(default_factory=dict)  # site -> history

    def record(self, site: str, entry: LedgerEntry) -> None:
        self.entries.setdefault(site, []).append(entry)

    def history(self, site: str, mechanism: str,
                extra: list[LedgerEntry] | None = None) -> list[list[float]]:
        rows = [e for e in self.entries.get(site, []) + (extra or []) if e.mechanism == mechanism]
        return [[e.noise_multiplier, e.sample_rate, e.steps] for e in rows]

    def epsilon(self, site: str, mechanism: str, extra: list[LedgerEntry] | None = None) -> float:
        return epsilon_for(self.history(site, mechanism, extra), self.delta, self.accountant)

    def summary(self) -> dict[str, dict[str, float]]:
        """site -> {"user_epsilon": ..., "sample_epsilon": ...} for mechanisms the site used."""
        out: dict[str, dict[str, float]] = {}
        for site, entries in sorted(self.entries.items()):
            used = sorted({e.mechanism for e in entries})
            out[site] = {f"{m}_epsilon": round(self.epsilon(site, m), 6) for m in used}
        return out

    def max_epsilon(self) -> float:
        values = [v for s in self.summary().values() for v in s.values()]
        return max(values, default=0.0)

    def first_site_over(self, budget: float, planned: dict[str, list[LedgerEntry]]) -> tuple[str, str, float] | None:
        """(site, mechanism, epsilon) of a site the planned entries would take past ``budget``."""
        for site, extra in sorted(planned.items()):
            for mechanism in MECHANISMS:
                if not any(e.mechanism == mechanism for e in extra):
                    continue
                eps = self.epsilon(site, mechanism, extra)
                if eps > budget:
                    return site, mechanism, eps
        return None

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "accountant": self.accountant,
                           "entries": {s: [asdict(e) for e in es] for s, es in self.entries.items()}})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """The ledger from :meth:`to_json`; :class:`LedgerError` naming the field if damaged."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"privacy ledger is not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise LedgerError("privacy ledger is not a JSON object")
        for name, kind in (("delta", (int, float)), ("accountant", str), ("entries", dict)):
            if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
                raise LedgerError(f"privacy ledger field '{name}' is missing or of the wrong type")
        entries: dict[str, list[LedgerEntry]] = {}
        for site, rows in raw["entries"].items():
            if not isinstance(rows, list):
                raise LedgerError(f"privacy ledger field 'entries.{site}' is not a list")
            for row in rows:
                if not isinstance(row, dict) or set(row) != set(_ENTRY_TYPES):
                    raise LedgerError(f"privacy ledger field 'entries.{site}': an entry needs "
                                      f"exactly the fields {', '.join(_ENTRY_TYPES)}")
                wrong = [k for k, kind in _ENTRY_TYPES.items()
                         if not isinstance(row[k], kind) or isinstance(row[k], bool)]
                if wrong:
                    raise LedgerError(f"privacy ledger field 'entries.{site}.{wrong[0]}' has the "
                                      "wrong type")
            entries[site] = [LedgerEntry(**row) for row in rows]
        return cls(delta=float(raw["delta"]), accountant=raw["accountant"], entries=entries)
