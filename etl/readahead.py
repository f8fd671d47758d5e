"""Iterate something slow a few items ahead, in a background thread.

Why: an extraction alternates between waiting for Rupa's next page and writing the current one
to the warehouse; both mostly wait on sockets or the database, with the GIL released, so
fetching the next pages while this one is written hides most of one behind the other (and the
pages that have arrived meanwhile can be written together: `ready()`). Validation alternates
between reading a block of the CSV (pyarrow's parser and NumPy, the GIL released) and checking
it: the next block is read while this one is checked (etl.intake.validate).

`ahead` bounds the memory: at most that many items are fetched and not yet taken, besides the
one the consumer holds (one, the default, for CSV blocks; a few small pages for extraction).
The next item is begun only when there is room for it.

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
    def __init__(self, source: Iterator[T], *, name: str = "read-ahead", ahead: int = 1) -> None:
        self._source = iter(source)
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=ahead + 1)
        # a turn is one item's room: taken before an item is begun, given back when the consumer
        # takes one, so never more than `ahead` items wait (finished or in the making)
        self._turn = threading.Semaphore(max(1, ahead))
        self._stop = threading.Event()
        self._done = False
        self._held: tuple[int, object] | None = None  # the end or an error that ready() met
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
        """Wait until there is room for one more item; False once the consumer has gone."""
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

    def _take(self, kind: int, value: object) -> tuple[bool, T | None]:
        """(True, item) for an item (its room given back: the next one can begin); (False, None)
        at the end; the source's exception raised."""
        if kind == _ITEM:
            self._turn.release()
            return True, value  # type: ignore[return-value]
        if kind == _DONE:
            self._done = True
            return False, None
        assert isinstance(value, BaseException)
        self._done = True
        raise value

    def __iter__(self) -> Iterator[T]:
        while not self._done:
            message, self._held = self._held or self._queue.get(), None
            got, item = self._take(*message)
            if not got:
                return
            yield item  # type: ignore[misc]

    def ready(self) -> list[T]:
        """The items already fetched, without waiting for more. The end, or the source's error,
        is left for the iteration: the items before it are handled first."""
        items: list[T] = []
        while not self._done and self._held is None:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                break
            if message[0] != _ITEM:
                self._held = message
                break
            items.append(self._take(*message)[1])  # type: ignore[arg-type]
        return items

    def close(self) -> None:
        """Stop fetching; items already fetched ahead are dropped."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
