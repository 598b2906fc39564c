"""The server console: one progress bar over all rounds, with the phase and the latest numbers."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.metrics import RoundRecord

HEADLINE = ("loss_mean", "dice_mean", "balanced_accuracy", "landmark_error_mm")


class RunProgress:
    def __init__(self, total_rounds: int, done: int) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("federation", total=max(total_rounds, 1), completed=done)
        self.progress.start()

    def advance(self, phase: str, phase_round: int, phase_rounds: int, record: RoundRecord) -> None:
        numbers = " ".join(f"{k}={float(record.aggregate[k]):.3f}" for k in HEADLINE
                           if isinstance(record.aggregate.get(k), (int, float)))
        description = (f"{phase} {phase_round}/{phase_rounds} [{record.status}, "
                       f"{len(record.sites)} sites] {numbers}")
        self.progress.update(self.task, advance=1, description=description)

    def close(self) -> None:
        self.progress.stop()
