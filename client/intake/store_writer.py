"""Store writes run in one background thread, so that a write's fsync overlaps other work.

Writing a series is mostly waiting for the disk (an 8 MB array and the manifest, each
fsync'ed: ~30 ms). Meanwhile the main thread reads on or builds the next series. Jobs run one
at a time in submission order, each as atomic as :class:`client.store.LocalStore` makes it;
the store is touched by no other thread while the writer is open. What follows a job (the
intake's bookkeeping) runs in the caller's thread, through the ``done`` callback given with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_PENDING = 2  # jobs waiting for the disk (a series job holds its array in memory)


class StoreWriter:
    """Runs store jobs in one thread, oldest first; reports them back in the caller's thread."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._max_pending = max(1, max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcmr-store-writer")
        self._pending: deque[tuple[Future, Callable[[Any], None]]] = deque()

    def submit(self, job: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Queue ``job``; ``done(its result)`` is called later from :meth:`submit`,
        :meth:`wait` or :meth:`close`. Waits while ``max_pending`` jobs are queued."""
        self._report(keep=self._max_pending - 1)
        self._pending.append((self._pool.submit(job), done))
        self._report(keep=None)

    def wait(self) -> None:
        """Until every queued job has run (and been reported)."""
        self._report(keep=0)

    def _report(self, keep: int | None) -> None:
        """Report finished jobs, oldest first, after waiting until at most ``keep`` remain
        (None: no waiting). A job's error is raised here."""
        while self._pending:
            future, done = self._pending[0]
            if not future.done() and (keep is None or len(self._pending) <= keep):
                return
            result = future.result()
            self._pending.popleft()
            done(result)

    def close(self, failed: bool) -> None:
        """Run the queued jobs (after a failure: only the one already running) and report
        each that succeeded; a job's error is raised unless the caller already has one."""
        if failed:
            for future, _ in self._pending:
                future.cancel()
        self._pool.shutdown(wait=True)
        error: BaseException | None = None
        while self._pending:
            future, done = self._pending.popleft()
            if future.cancelled():
                continue
            if future.exception() is not None:
                error = error or future.exception()
                continue
            done(future.result())
        if error is not None and not failed:
            raise error

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(failed=exc_type is not None)
