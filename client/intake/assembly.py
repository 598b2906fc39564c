"""Reading results -> series parts, in scan order; a series the scan has moved past settles early.

Results come back from the reading processes chunk by chunk, in any order. They are taken in
scan order, so that of two files holding the same SOP instance the first one scanned is kept,
exactly as in a sequential read.

The scan lists each folder's files together, so once it has moved on to a later folder no more
files come from the folders a series was found in. Such a series is *settled*: handed on to be
built and written while the rest is still read, which hides its store write (mostly fsync) behind
the reading. A series spread over folders can still gain a file after settling: that *reopens*
it, and it is built again at the end from all its files (those read before settling are read
once more, see :meth:`SeriesAssembly.reread`); after one reopening nothing more settles, so an
export laid out that way costs at most one series read twice. Nothing in the store, the index
or the summary depends on whether a series settled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from client.intake.reading import InstanceResult
from client.intake.series import SeriesParts


@dataclass
class _Settled:
    """What a settled series was made of, in case it reopens."""

    files: list[int]
    instances: list[str]


@dataclass
class SeriesAssembly:
    """Groups accepted files into series parts; reports skipped files and settled series.

    ``folder_of[i]`` numbers the folder of scan index i (non-decreasing along the scan);
    ``may_settle(key)`` says whether a series may be handed on early (the intake allows it for
    series new to the store); ``on_skip(index, reason)`` and ``on_settled(parts)`` are called
    in the caller's thread.
    """

    folder_of: list[int]
    may_settle: Callable[[str], bool]
    on_skip: Callable[[int, str], None]
    on_settled: Callable[[SeriesParts], None]
    parts: dict[str, SeriesParts] = field(default_factory=dict)  # open series
    settled: dict[str, _Settled] = field(default_factory=dict)
    reopened: set[str] = field(default_factory=set)
    _order: list[int] = field(default_factory=list)
    _next: int = 0
    _waiting: dict[int, InstanceResult] = field(default_factory=dict)
    _folder: int = -1
    _touched: set[str] = field(default_factory=set)  # series that gained a file in this folder
    _seen: dict[str, set[str]] = field(default_factory=dict)  # series key -> instance digests
    _instances: dict[str, list[str]] = field(default_factory=dict)
    _settling: bool = True

    def expect(self, order: Iterable[int], settling: bool = True) -> None:
        """The scan indices about to be read, in scan order (a new pass over some files)."""
        self._order, self._next, self._settling = list(order), 0, settling

    def deliver(self, results: Iterable[InstanceResult]) -> None:
        """Take results in any order; they are used in scan order as the gaps fill."""
        for result in results:
            self._waiting[result.index] = result
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            self._take(self._waiting.pop(self._order[self._next]))
            self._next += 1

    def close_pass(self) -> None:
        """The pass is read: use what is left (results of every index have been delivered)."""
        for index in sorted(self._waiting):
            self._take(self._waiting.pop(index))

    def reread(self) -> list[int]:
        """Scan indices to read again: the files of settled series that reopened."""
        files = []
        for key in sorted(self.reopened):
            before = self.settled[key]
            self._seen[key].difference_update(before.instances)  # they come back
            files.extend(before.files)
        return sorted(files)

    def _take(self, result: InstanceResult) -> None:
        folder = self.folder_of[result.index]
        if self._settling and folder != self._folder:
            self._settle_touched()
            self._folder = folder
        if result.reason:
            self.on_skip(result.index, result.reason)
        elif result.instance in self._seen.setdefault(result.key, set()):
            self.on_skip(result.index, "duplicate_instance")
        else:
            self._add(result)

    def _add(self, result: InstanceResult) -> None:
        key = result.key
        self._seen[key].add(result.instance)
        if key in self.settled and key not in self.parts:
            self.reopened.add(key)
            self._settling = False  # this export spreads series over folders: stop guessing
        entry = self.parts.get(key)
        if entry is None:
            entry = self.parts[key] = SeriesParts(
                key=key, subject=result.subject, study_uid=result.study_uid,
                series_uid=result.series_uid)
            self._instances[key] = []
        entry.frames.extend(result.frames)
        entry.files.append(result.index)
        entry.fingerprints.append(result.fingerprint)
        self._instances[key].append(result.instance)
        if result.hints is not None:
            entry.hints.append(result.hints)
        if self._settling:
            self._touched.add(key)

    def _settle_touched(self) -> None:
        """The scan left a folder: settle the series that last gained a file there."""
        for key in sorted(self._touched):
            if key in self.parts and key not in self.reopened and self.may_settle(key):
                parts = self.parts.pop(key)
                self.settled[key] = _Settled(files=list(parts.files),
                                             instances=self._instances.pop(key))
                self.on_settled(parts)
        self._touched.clear()
