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
        self._source = source
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(_ITEM, item):
                    return
            self._put(_DONE, None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_ERROR, exc)

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
