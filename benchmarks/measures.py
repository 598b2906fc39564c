"""What every benchmark reports to ``make bench``: named measures with their goals.

A benchmark given ``--json FILE`` writes ``{"benchmark", "machine", "measures": [...]}``; each
measure has a value, a goal (text such as ">= 0.8", or "" where there is none) and whether it
held. ``benchmarks/run_all.py`` collects the files into ``bench-results.json`` and one table.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measure:
    measure: str
    value: float
    goal: str = ""  # e.g. ">= 0.8", "<= 1.5", "> 0"; "" when the number is for information
    unit: str = ""

    @property
    def held(self) -> bool | None:
        if not self.goal:
            return None
        op, _, bound = self.goal.partition(" ")
        compare = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}
        if op not in compare:
            raise ValueError(f"goal '{self.goal}': expected one of {', '.join(compare)} and a number")
        return compare[op](float(self.value), float(bound))


def machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load {load}"


def write_measures(path: Path | None, benchmark: str, measures: list[Measure]) -> None:
    if path is None:
        return
    rows = [{**asdict(m), "held": m.held} for m in measures]
    path.write_text(json.dumps({"benchmark": benchmark, "machine": machine(), "measures": rows},
                               indent=1))
