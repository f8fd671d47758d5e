"""Iterate something slow one item ahead, in a background thread.

Why: an extraction alternates between waiting for Rupa's next page and writing the current one
to the warehouse; both mostly wait on sockets or SQLite, with the GIL released, so fetching the
next page while this one is written hides most of one behind the other. Validation alternates
between reading a block of the CSV (pyarrow's parser and NumPy, the GIL released) and checking
it: the next block is read while this one is checked (etl.batches.validate). One item ahead,
not more: memory stays at two pages (two blocks), and a stored next-page URL is never more than
one page behind.

The consumer sees items in order, then the source's own exception (re-raised in its thread,
traceback kept) if it failed. `close()` stops the thread at the next item boundary; it never
waits for an HTTP request in flight (the thread is a daemon and its client is closed by the
caller).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _DONE, _ERROR = range(3)


class ReadAhead(Generic[T]):
    def __init__(self, source: Iterator[T], *, name: str = "read-ahead") -> None:
        self._source = iter(source)
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=1)
        # the next item is fetched only once the consumer has taken the one before: one item
        # ahead, never two (one in the queue and another in the making)
        self._turn = threading.Semaphore(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._wait_turn():
                try:
                    item = next(self._source)
                except StopIteration:
                    self._put(_DONE, None)
                    return
                if not self._put(_ITEM, item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_ERROR, exc)

    def _wait_turn(self) -> bool:
        """Wait until the consumer has taken the last item; False once it has gone (close())."""
        while not self._stop.is_set():
            if self._turn.acquire(timeout=0.2):
                return not self._stop.is_set()
        return False

    def _put(self, kind: int, value: object) -> bool:
        """Hand one message over, unless the consumer has gone (close())."""
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            kind, value = self._queue.get()
            if kind == _ITEM:
                self._turn.release()  # fetch the next one while this one is used
                yield value  # type: ignore[misc]
            elif kind == _DONE:
                return
            else:
                assert isinstance(value, BaseException)
                raise value

    def close(self) -> None:
        """Stop fetching; an item already fetched ahead is dropped."""
        self._stop.set()
        try:
            self._queue.get_nowait()
        except queue.Empty:
            pass
