"""When a load gives up: a circuit breaker and a deadline, shared by all workers of one load.

Without them a vendor that never answers holds a batch for hours: every row waits out its
timeout on every attempt. With them:

- **Breaker**: every attempt that ends in a transport error (timeout, refused or dropped
  connection), a 5xx answer or a Retry-After longer than the cap counts as a failure; any other
  answer (2xx, 4xx) resets the count; a 429 within the cap is neither. After
  `LGC_BREAKER_FAILURES` failures in a row, across the load's workers, the breaker opens: no
  new request starts, rows still waiting end `failed` with the reason below and go out on a
  later run.
- **Deadline**: `LGC_LOAD_DEADLINE` seconds after the load started, the same happens with the
  reason "deadline reached". Requests already on the wire finish (bounded by
  LABSYNC_HTTP_TIMEOUT); nothing new starts.

With the defaults (30 s timeout, 8 workers, 10 failures) a load of any size against a vendor
that accepts connections and never answers ends after about two rounds of timeouts: 1-2 minutes.

The client calls `check()` right before each request, `failure()` / `success()` after it, and
uses `sleep()` between retries and `future` while it waits for the vendor budget, so a trip
cuts every wait short. Single event loop; no locking needed.
"""

from __future__ import annotations

import asyncio

from etl.errors import Tripped

AGAIN = "sent again on the next run"


class Breaker:
    """`failures` in a row open it (0 = never); `deadline` seconds after `start()` too (0 = none).
    `on_trip(cause)` is called once, when it opens."""

    def __init__(self, failures: int = 0, deadline: float = 0.0, *, on_trip=None) -> None:
        self.limit = failures
        self.deadline = deadline
        self.on_trip = on_trip
        self.streak = 0
        self._kinds: list[str] = []  # what the failures of the current streak were
        self.cause: str | None = None  # why it opened (without "not sent")
        self._future: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_load(cls, lgc, *, on_trip=None) -> Breaker:
        """The breaker of one load, from LgcSettings."""
        return cls(lgc.breaker_failures, lgc.load_deadline, on_trip=on_trip)

    # ---- life ----------------------------------------------------------------------------
    def start(self) -> Breaker:
        """Arm the deadline (call inside the running loop)."""
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        if self.cause is not None:
            self._future.set_result(self.cause)
        if self.deadline > 0:
            self._timer = loop.call_later(
                self.deadline, self.trip,
                f"deadline reached (LGC_LOAD_DEADLINE {self.deadline:g}s after the load started)",
            )
        return self

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # ---- state ---------------------------------------------------------------------------
    @property
    def tripped(self) -> bool:
        return self.cause is not None

    @property
    def reason(self) -> str | None:
        """What a row that was never sent records: a true sentence, PHI-free."""
        return None if self.cause is None else f"not sent: {self.cause}; {AGAIN}"

    def reason_after(self, last: str, attempts: int) -> str:
        """What a row that was tried (and failed) before the trip records."""
        return f"{last} ({attempts} attempts), then the batch stopped: {self.cause}; {AGAIN}"

    @property
    def future(self) -> asyncio.Future | None:
        """Done once tripped: waits (budget, backoff) race it to end early."""
        return self._future

    def trip(self, cause: str) -> None:
        if self.cause is not None:
            return
        self.cause = cause
        if self._future is not None and not self._future.done():
            self._future.set_result(cause)
        if self.on_trip is not None:
            self.on_trip(cause)

    def check(self) -> None:
        """Before a request starts: raise Tripped when nothing new may start."""
        if self.cause is not None:
            raise Tripped(self.cause)

    # ---- what the vendor did -------------------------------------------------------------
    def failure(self, kind: str) -> None:
        """One attempt failed: `kind` is a short PHI-free label ("HTTP 503", "timed out")."""
        self.streak += 1
        if kind not in self._kinds:
            self._kinds.append(kind)
        if self.limit and self.streak >= self.limit:
            self.trip(f"LetsGetChecked failed {self.streak} times in a row ({' / '.join(self._kinds)})")

    def success(self) -> None:
        """The vendor answered (anything but a 5xx or a too-long Retry-After)."""
        self.streak = 0
        self._kinds.clear()

    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep that ends early when the breaker opens (the retry policy's sleep)."""
        if seconds <= 0:
            return
        if self._future is None:
            await asyncio.sleep(seconds)
        else:
            await asyncio.wait({self._future}, timeout=seconds)
