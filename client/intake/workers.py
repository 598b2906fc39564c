"""Reading processes that can die or hang on one file without costing any other file.

A process pool cannot tell which task killed a worker (every pending task fails with it), nor
stop a task stuck in a decoder. Here each worker holds one chunk at a time, so a death or a
time-out is attributable: the chunk is split and retried file by file in fresh workers, and a
file that still kills (or stalls) its worker alone is skipped as ``worker_crashed`` (or
``read_timeout``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from multiprocessing.connection import Connection, wait
from typing import Literal

from client.intake.reading import InstanceResult, ReadSettings, init_worker, read_chunk

Item = tuple[int, str]  # (scan index, path)
Deliver = Callable[[list[InstanceResult]], None]


class _Dead(Enum):
    DEAD = "dead"  # what _receive says of a worker that died or hangs


_DEAD = _Dead.DEAD
Context = multiprocessing.context.ForkContext | multiprocessing.context.SpawnContext
SECONDS_PER_FILE = 60.0  # a file taking longer than this is stuck (a healthy one takes ms)


def _context() -> Context:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork") if "fork" in methods else multiprocessing.get_context("spawn")


def _worker_main(conn: Connection, settings: ReadSettings) -> None:
    init_worker(settings)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(read_chunk(job))


class _Worker:
    """One reading process and the chunk it holds (if any)."""

    def __init__(self, ctx: Context, settings: ReadSettings) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, settings), daemon=True)
        self.process.start()
        child.close()
        self.job: list[Item] | None = None
        self.deadline = 0.0

    def give(self, job: list[Item], seconds_per_file: float) -> None:
        self.job = job
        self.deadline = time.monotonic() + seconds_per_file * len(job)
        self.conn.send(job)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def read_in_workers(items: list[Item], settings: ReadSettings, workers: int, chunk_files: int,
                    advance: Callable[[int], None], pause: Callable[[], contextlib.AbstractContextManager],
                    seconds_per_file: float | None = None,
                    deliver: Deliver | None = None) -> list[InstanceResult]:
    """Read ``items`` in ``workers`` processes, chunk by chunk; never raises for a bad file.

    Each chunk's results go to ``deliver`` as soon as they are back (in no particular order),
    or, without it, into the list returned. ``pause()`` returns a context manager during which
    new processes are forked (the caller stops its other threads' work meanwhile).
    """
    seconds_per_file = seconds_per_file or SECONDS_PER_FILE
    ctx = _context()
    queue = deque(_chunks(items, chunk_files, workers))
    out: list[InstanceResult] = []
    emit: Deliver = deliver or out.extend
    with pause():
        pool = [_Worker(ctx, settings) for _ in range(min(workers, len(queue)) or 1)]
    try:
        while queue or any(w.job for w in pool):
            for worker in pool:
                if worker.job is None and queue:
                    worker.give(queue.popleft(), seconds_per_file)
            busy = [w for w in pool if w.job]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            finished = []
            for index, worker in enumerate(pool):
                if not worker.job:
                    continue
                results = _receive(worker)
                if results is _DEAD:
                    pool[index] = _replace(worker, ctx, settings, queue, emit, advance, pause)
                elif results is not None:
                    advance(len(worker.job))
                    worker.job = None
                    if queue:  # busy again before its results are used (which takes a while)
                        worker.give(queue.popleft(), seconds_per_file)
                    finished.append(results)
            for results in finished:
                emit(results)
    finally:
        for worker in pool:
            worker.stop()
    return out


def _chunks(items: list[Item], size: int, workers: int) -> list[list[Item]]:
    """Chunks of ``size`` files, then smaller ones: the workers finish close together."""
    tail = min(len(items), 2 * max(1, workers) * size)
    small = max(1, size // 4)
    head = len(items) - tail
    return ([items[i:min(i + size, head)] for i in range(0, head, size)]
            + [items[i:i + small] for i in range(head, len(items), small)])


def _receive(worker: _Worker) -> list[InstanceResult] | None | Literal[_Dead.DEAD]:
    """A finished chunk's results; None while it is working; _DEAD when the worker died or
    overran its deadline."""
    try:
        if worker.conn.poll():
            return worker.conn.recv()
    except (EOFError, OSError):
        return _DEAD
    if worker.process.is_alive() and time.monotonic() < worker.deadline:
        return None
    return _DEAD


def _replace(worker: _Worker, ctx: Context, settings: ReadSettings,
             queue: deque, emit: Deliver, advance: Callable[[int], None],
             pause: Callable[[], contextlib.AbstractContextManager]) -> _Worker:
    """Kill a dead or stuck worker; retry its chunk file by file, or skip its single file."""
    job, stuck = worker.job or [], worker.process.is_alive()
    worker.stop(kill=True)
    if len(job) == 1:
        emit([InstanceResult(index=job[0][0], reason="read_timeout" if stuck else "worker_crashed")])
        advance(1)
    else:
        queue.extendleft([item] for item in reversed(job))
    with pause():
        return _Worker(ctx, settings)
