"""The reliability and security suite: sixteen checks, the tests that try them, one table.

Tests carry ``@pytest.mark.reliability(N, ...)`` for the checks they try; every marked test is
one case. ``make reliability`` runs the marked tests and prints, per check, the cases tried,
the cases that held and what of the check no test tries yet. A check *held* when it is
complete (nothing missing) and every case passed; a check with no test is *not run*, and one
with cases still missing is *partial*, never held.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    missing: str = ""  # the check's cases no test tries yet ("" = complete)


CHECKS = (
    Check(1, "Node allow-list"),
    Check(2, "Authentication abuse"),
    Check(3, "TLS"),
    Check(4, "App allow-list at the node",
          "all: stock Flower 1.42 signs only Flower Hub apps, so a node cannot require signed apps"),
    Check(5, "Poisoned update contents"),
    Check(6, "Byzantine norms"),
    Check(7, "SecAgg+ exactness"),
    Check(8, "SecAgg+ drop-outs"),
    Check(9, "Malicious-server probes at the node"),
    Check(10, "Privacy accounting"),
    Check(11, "Node killed and straggler"),
    Check(12, "Server crash"),
    Check(13, "Unsafe deserialisation"),
    Check(14, "Message size",
          "the transport: Flower 1.42's SuperLink takes gRPC messages up to 2 GB and stores them "
          "before the server app sees them; SecAgg+'s masked vectors are sized by Flower"),
    Check(15, "DICOM fuzzing"),
    Check(16, "PHI never leaves"),
)
BY_NUMBER = {c.number: c for c in CHECKS}


@dataclass
class Tally:
    tried: int = 0
    held: int = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability", action="store_true",
                     help="print the reliability table of the marked tests that ran")
    parser.addoption("--reliability-json", default="", help="also write the table as JSON here")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability(*checks): the reliability checks a test tries")


# one pytest session per process: the marked cases and their outcomes
CASES: dict[str, list[int]] = {}
OUTCOMES: dict[str, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        numbers = [n for mark in item.iter_markers("reliability") for n in mark.args]
        unknown = [n for n in numbers if n not in BY_NUMBER]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: no reliability check {unknown}")
        if numbers:
            CASES[item.nodeid] = sorted(set(numbers))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in CASES:
        return
    if report.failed:
        OUTCOMES[report.nodeid] = "failed"
    elif report.when == "call" and report.passed:
        OUTCOMES.setdefault(report.nodeid, "passed")
    elif report.skipped:
        OUTCOMES.setdefault(report.nodeid, "skipped")


def table(cases: dict[str, list[int]], outcomes: dict[str, str]) -> list[dict]:
    """One row per check: cases tried (ran, not skipped), held (passed), status."""
    tallies = {c.number: Tally() for c in CHECKS}
    for nodeid, numbers in cases.items():
        outcome = outcomes.get(nodeid)
        for n in numbers:
            if outcome in ("passed", "failed"):
                tallies[n].tried += 1
                tallies[n].held += outcome == "passed"
    rows = []
    for check in CHECKS:
        t = tallies[check.number]
        if t.tried == 0:
            status = "not run"
        elif t.held < t.tried:
            status = "failed"
        elif check.missing:
            status = "partial"
        else:
            status = "held"
        rows.append({"check": check.number, "name": check.name, "tried": t.tried, "held": t.held,
                     "status": status, "missing": check.missing})
    return rows


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not config.getoption("--reliability"):
        return
    rows = table(CASES, OUTCOMES)
    write = terminalreporter.write_line
    write("")
    write(f"{'check':<42} {'tried':>5} {'held':>5}  status   not tried yet")
    for r in rows:
        write(f"{r['check']:>2}. {r['name']:<38} {r['tried']:>5} {r['held']:>5}  {r['status']:<8} "
              f"{r['missing']}")
    held = sum(r["status"] == "held" for r in rows)
    write(f"reliability: {held}/{len(rows)} checks held (machine: {platform.machine()}, "
          f"{platform.python_implementation()} {platform.python_version()})")
    if config.getoption("--reliability-json"):
        Path(config.getoption("--reliability-json")).write_text(json.dumps(
            {"checks": rows, "held": held, "of": len(rows)}, indent=2) + "\n")
