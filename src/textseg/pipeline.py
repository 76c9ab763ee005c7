"""The pipeline that never waits: background preparation, batched forwards, background writes.

One home for the overlap of CPU work with the model, used by ``textseg segment`` on folders and by
``textseg eval`` (:func:`textseg.evaluate.evaluate`)::

    for item, prepared, error in prefetch(paths, prepare, workers=1, depth=4):
        ...                                     # prepare(path) ran in a background thread

    with BackgroundWriter(max_pending=8) as writer:
        writer.submit(save_image, mask, path)   # returns at once; runs in the writer thread

- :func:`prefetch`: ``prepare(item)`` (decode, resize, normalise) runs in ``workers`` threads
  (PIL decoding / resizing and torch operations release the GIL) at most ``depth`` items ahead of
  the consumer, so memory is bounded by ``depth`` prepared items; results come back in input order.
  ``workers=0`` runs ``prepare`` in the caller's thread (the same results, no overlap). A
  :class:`~textseg.errors.TextsegError` of one item is returned with it (the run goes on); any
  other exception is a bug and propagates.
- :func:`batch_or_each`: a batched call, or on its failure each item alone (its result or its error).
- :func:`chunks`: consecutive items in groups of at most ``n`` (the images one batched forward of
  :meth:`textseg.segment.Segmenter.segment_batch` takes: same-size crops share a forward pass).
- :class:`Batcher`: concurrent callers' items gathered (at most ``max_batch``, waiting at most
  ``max_wait_s`` after the first) into one batched call -- the web server's image tower on CUDA.
- :class:`BackgroundWriter`: output files (PNG / JSON, written atomically by their writers) are
  written by one thread from a bounded queue, in submission order; the first failure is re-raised
  in the caller's thread (at the next :meth:`~BackgroundWriter.submit` or at
  :meth:`~BackgroundWriter.close`) as one :class:`~textseg.errors.TextsegError` line naming what
  was being written (an ``OSError`` too; any other exception, e.g. ``KeyboardInterrupt``, as it
  is), and nothing after it is written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from textseg.errors import TextsegError

DEFAULT_WORKERS = 1
DEFAULT_DEPTH = 4


def _call(fn: Callable, item) -> tuple[Any, TextsegError | None]:
    try:
        return fn(item), None
    except TextsegError as e:
        return None, e


def prefetch(items: Iterable, prepare: Callable, workers: int = DEFAULT_WORKERS,
             depth: int = DEFAULT_DEPTH) -> Iterator[tuple[Any, Any, TextsegError | None]]:
    """``(item, prepare(item), None)`` -- or ``(item, None, error)`` when ``prepare`` raised a
    :class:`TextsegError` -- for each of ``items``, in order, with ``prepare`` running in ``workers``
    background threads at most ``depth`` items ahead (``workers=0``: in this thread, lazily).

    At most ``depth`` items are taken from ``items`` beyond those already yielded (the memory bound)."""
    if workers < 0:
        raise TextsegError(f"prefetch workers must be >= 0, got {workers}")
    if depth < 1:
        raise TextsegError(f"prefetch depth must be >= 1, got {depth}")
    if workers == 0:
        for item in items:
            yield (item, *_call(prepare, item))
        return
    it = iter(items)
    pending: deque[tuple[Any, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="textseg-prefetch")
    try:
        def fill() -> None:
            while len(pending) < depth:
                try:
                    item = next(it)
                except StopIteration:
                    return
                pending.append((item, pool.submit(_call, prepare, item)))

        fill()
        while pending:
            item, fut = pending.popleft()
            value, error = fut.result()  # a non-TextsegError propagates from here
            fill()  # the next item starts before this one is consumed
            yield item, value, error
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def batch_or_each(fn: Callable[[list], list], items: list) -> list:
    """``fn(items)`` (one result per item); when that batched call raises a :class:`TextsegError`,
    ``fn([item])`` for each item alone, to find the one at fault: each entry is then its result or its
    ``TextsegError``. A single item is run once."""
    if len(items) > 1:
        try:
            return list(fn(items))
        except TextsegError:
            pass  # find the item at fault: one at a time
    out: list = []
    for item in items:
        try:
            out.append(fn([item])[0])
        except TextsegError as e:
            out.append(e)
    return out


def chunks(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive groups of at most ``n`` (>= 1) items."""
    n = max(1, int(n))
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


_STOP = object()


class BackgroundWriter:
    """Run write jobs in one background thread from a queue of at most ``max_pending`` jobs
    (:meth:`submit` blocks while it is full: bounded memory). ``workers=0``: jobs run at once in
    the caller's thread. See the module docstring for how errors surface."""

    def __init__(self, max_pending: int = 8, workers: int = 1):
        if max_pending < 1:
            raise TextsegError(f"writer queue must hold >= 1 job, got {max_pending}")
        self.error: BaseException | None = None
        self._sync = workers == 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = None
        if not self._sync:
            self._thread = threading.Thread(target=self._loop, name="textseg-writer", daemon=True)
            self._thread.start()

    @staticmethod
    def _run(what: str, fn: Callable, args, kwargs) -> BaseException | None:
        try:
            fn(*args, **kwargs)
        except TextsegError as e:
            return TextsegError(f"writing {what} failed: {e}" if what else str(e))
        except OSError as e:  # disk full, permissions, ...: one line, not a traceback
            return TextsegError(f"writing {what or 'output'} failed: {e.strerror or e}")
        except BaseException as e:  # noqa: BLE001 -- a bug or an interrupt: re-raised as is in the caller
            return e
        return None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self.error is None:  # after a failure the remaining jobs are dropped
                    self.error = self._run(*job)
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, fn: Callable, *args, what: str = "", **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)`` (``what`` names it in an error); raises the first earlier
        failure instead, if there was one."""
        self._raise()
        if self._sync:
            self.error = self._run(what, fn, args, kwargs)
            self._raise()
            return
        if self._thread is None:
            raise TextsegError("the writer is closed")
        self._queue.put((what, fn, args, kwargs))

    def flush(self) -> None:
        """Wait until every queued job ran; raise the first failure."""
        if not self._sync:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        """Finish the queued jobs, stop the thread, raise the first failure."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: finish the thread without masking that exception
            try:
                self.close()
            except TextsegError:
                pass


class Batcher:
    """Gather concurrent calls into one batched call (the web server's image tower on CUDA).

    :meth:`submit` ``(key, item)`` from any number of threads blocks until ``fn(key, items)`` -- one
    call for the items of one key gathered together, returning one result per item, in order -- has
    run in the batcher's thread. A batch closes when it holds ``max_batch`` items or ``max_wait_s``
    after its first item arrived (the bounded wait: a lone request waits at most that long). When a
    batched call raises a :class:`TextsegError`, its items are run one at a time, so one bad item
    fails only its own caller; any error reaches the caller whose item it was."""

    def __init__(self, fn: Callable[[Any, list], list], max_batch: int = 8, max_wait_s: float = 0.01):
        if max_batch < 1:
            raise TextsegError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.max_batch, self.max_wait_s = fn, int(max_batch), float(max_wait_s)
        self.batches: list[int] = []  # sizes of the batched calls made (the last 1000)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, key, item):
        """``fn(key, [..., item, ...])``'s result for ``item`` (raises what computing it raised)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="textseg-batcher", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((key, item, fut))
        return fut.result()

    def _gather(self, first) -> list:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                nxt = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if nxt is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(nxt)
        return batch

    def _run(self, key, jobs: list) -> None:
        items = [item for _, item, _ in jobs]
        try:
            results = self.fn(key, items)
            self.batches = [*self.batches[-999:], len(items)]
        except TextsegError:
            if len(jobs) == 1:
                raise
            for job in jobs:  # find the item at fault: one at a time
                try:
                    self._run(key, [job])
                except BaseException as e:  # noqa: BLE001 -- handed to its caller
                    job[2].set_exception(e)
            return
        for (_, _, fut), res in zip(jobs, results):
            fut.set_result(res)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            groups: dict = {}
            for job in self._gather(first):
                groups.setdefault(job[0], []).append(job)
            for key, jobs in groups.items():
                try:
                    self._run(key, jobs)
                except BaseException as e:  # noqa: BLE001 -- handed to the callers, never lost
                    for _, _, fut in jobs:
                        if not fut.done():
                            fut.set_exception(e)

    def close(self) -> None:
        """Stop the thread after the calls already submitted."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None
