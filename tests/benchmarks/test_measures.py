"""The goals a benchmark measure is held against."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from measures import Measure  # noqa: E402 - the benchmarks folder is not a package


@pytest.mark.parametrize(("value", "goal", "held"), [
    (0.8, ">= 0.8", True), (0.79, ">= 0.8", False), (1.5, "<= 1.5", True), (1.6, "<= 1.5", False),
    (0.1, "> 0", True), (0.0, "> 0", False), (-3.0, "> 0", False), (0.9, "< 1", True),
    (1.0, "", None),
])
def test_a_goal_holds_exactly_as_written(value: float, goal: str, held: bool | None) -> None:
    assert Measure("m", value, goal).held is held


def test_a_goal_without_a_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        _ = Measure("m", 1.0, "== 1").held
