"""What a node keeps between a run's rounds: per run token, per round, on its disk."""

from pathlib import Path

import pytest
import torch

from client.run_local import KEEP, RunLocalError, RunLocalState, Snapshot


def _snapshot(value: float, history: list[list[float]] | None = None) -> Snapshot:
    return Snapshot({"ssl_head": {"head.w": torch.full((2, 3), value)},
                     "head/sax_seg": {"head.out.bias": torch.tensor([value])}}, history or [])


def test_a_round_starts_from_the_newest_earlier_round(tmp_path: Path) -> None:
    # Prepare
    state = RunLocalState(tmp_path, "0123abcd")
    for round_ in (1, 2, 3):
        state.save(round_, _snapshot(float(round_), [[1.0, 0.01, round_]]))

    # Execute
    before_three, first, none = state.load(2), state.load(1), state.load(0)

    # Assert
    assert torch.equal(before_three.groups["ssl_head"]["head.w"], torch.full((2, 3), 2.0))
    assert torch.equal(before_three.groups["head/sax_seg"]["head.out.bias"], torch.tensor([2.0]))
    assert before_three.dp_history == [[1.0, 0.01, 2]]
    assert float(first.groups["ssl_head"]["head.w"][0, 0]) == 1.0
    assert none.groups == {} and none.dp_history == []


def test_redoing_a_round_drops_the_rounds_after_it_and_old_ones_are_pruned(tmp_path: Path) -> None:
    # Prepare: rounds 1..6 trained, then the server resumes from its checkpoint of round 4
    state = RunLocalState(tmp_path, "run-1")
    for round_ in range(1, 7):
        state.save(round_, _snapshot(float(round_)))

    # Execute: round 5 redone
    redo = state.load(4)
    state.save(5, _snapshot(50.0))

    # Assert: round 5 started from round 4; round 6 (never aggregated) is gone; of the rest
    # only the newest KEEP ever stay (6 - KEEP + 1 .. 6 after round 6, so 4 and 5 now)
    assert float(redo.groups["ssl_head"]["head.w"][0, 0]) == 4.0
    assert float(state.load(10).groups["ssl_head"]["head.w"][0, 0]) == 50.0
    assert sorted(p.name for p in state.folder.iterdir()) == [f"r{r}.safetensors" for r in range(7 - KEEP, 6)]


def test_runs_are_kept_apart(tmp_path: Path) -> None:
    RunLocalState(tmp_path, "a").save(1, _snapshot(1.0))
    assert RunLocalState(tmp_path, "b").load(5).groups == {}


@pytest.mark.parametrize("token", ["../escape", "", "A" * 3, "x" * 65, "a/b"])
def test_a_token_that_is_not_a_plain_name_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(RunLocalError, match="run token"):
        RunLocalState(tmp_path, token)


def test_a_damaged_snapshot_is_named_with_what_to_do(tmp_path: Path) -> None:
    # Prepare
    state = RunLocalState(tmp_path, "run")
    path = state.save(1, _snapshot(1.0))
    path.write_bytes(b"not safetensors")

    # Execute / Assert
    with pytest.raises(RunLocalError, match=r"r1\.safetensors.*delete the run's folder"):
        state.load(3)
