"""Switchable faults for the sandbox APIs, as ASGI middleware around one vendor's app.

Switches (all off by default), set with `POST /_sandbox/{vendor}/faults` (JSON body with any of
the fields below) or in code through `Faults`:

- latency:        seconds from a request's arrival to its answer (the request is handled at
                  once; its answer leaves when the time is up, as a vendor whose answers take
                  that long: the sandbox's own work does not add to it)
- error_rate:     fraction of requests answered 500 or 503 *without* being processed
- throttle_rate:  fraction of requests answered 429 with `Retry-After: retry_after`
- retry_after:    seconds sent in Retry-After (may be fractional)
- drop_rate:      fraction of requests that are processed (the order is stored, the page is
                  served) and whose connection is then dropped before the response completes
- hang:           true: accept every request and never answer it (a vendor that hangs); the
                  held requests are answered 503, unprocessed, once it is switched off again
- script:         a list of statuses (500, 503, 429) or "drop", consumed one per request
                  before the random switches: deterministic faults for tests
- seed:           seed for the random switches (reproducible storms)
- exempt_paths:   path prefixes that never get a fault (e.g. the token endpoint)
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import asdict, dataclass, field


class _Drop(Exception):
    """Raised after the response started: the server closes the connection mid-response."""


@dataclass
class Faults:
    latency: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    hang: bool = False
    script: list = field(default_factory=list)
    seed: int | None = None
    exempt_paths: list[str] = field(default_factory=list)
    # counters, for tests and the demo
    # (and "hung" once a request was held by `hang`)
    injected: dict = field(default_factory=lambda: {"errors": 0, "throttled": 0, "dropped": 0})

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)

    def update(self, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                if key not in {"latency", "error_rate", "throttle_rate", "retry_after", "drop_rate", "hang", "script",
                               "seed", "exempt_paths"}:
                    raise ValueError(f"unknown fault switch {key!r}")
                setattr(self, key, value)
            if "seed" in changes:
                self._rng = random.Random(self.seed)

    def reset(self) -> None:
        with self._lock:
            self.latency = self.error_rate = self.throttle_rate = self.drop_rate = 0.0
            self.retry_after = 1.0
            self.hang = False
            self.script = []
            self.exempt_paths = []
            self.injected = {"errors": 0, "throttled": 0, "dropped": 0}

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def decide(self, path: str) -> str | int | None:
        """What to do with this request: None (serve), 500/503/429, "drop" or "hang"."""
        if any(path.startswith(p) for p in self.exempt_paths):
            return None
        with self._lock:
            if self.hang:
                return "hang"
            if self.script:
                return self.script.pop(0)
            r = self._rng.random()
            if r < self.error_rate:
                return self._rng.choice((500, 503))
            r -= self.error_rate
            if r < self.throttle_rate:
                return 429
            r -= self.throttle_rate
            if r < self.drop_rate:
                return "drop"
            return None

    def count(self, what: str) -> None:
        with self._lock:
            self.injected[what] = self.injected.get(what, 0) + 1


class FaultMiddleware:
    """Applies a `Faults` to every HTTP request of the wrapped ASGI app."""

    def __init__(self, app, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.faults.latency:
            send = _answered_at(send, asyncio.get_running_loop().time() + self.faults.latency)
        decision = self.faults.decide(scope.get("path", ""))
        if decision in (500, 503):
            self.faults.count("errors")
            return await _plain(send, decision, {"title": "Server Error", "status": decision})
        if decision == 429:
            self.faults.count("throttled")
            return await _plain(
                send, 429, {"title": "Too Many Requests", "status": 429},
                [(b"retry-after", str(self.faults.retry_after).encode())],
            )
        if decision == "hang":
            self.faults.count("hung")
            while self.faults.hang:  # hold the connection open, answer nothing
                await asyncio.sleep(0.05)
            return await _plain(send, 503, {"title": "Service Unavailable", "status": 503})
        if decision == "drop":
            self.faults.count("dropped")
            return await self._drop_after(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _drop_after(self, scope, receive, send):
        """Run the app for real (side effects happen), then break the connection mid-response."""

        async def swallow(message):
            return None

        await self.app(scope, receive, swallow)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        raise _Drop("connection dropped by the sandbox's fault switch")


def _answered_at(send, due: float):
    """`send`, with the answer held back until the loop's clock reaches `due`."""

    async def held(message):
        if message["type"] == "http.response.start":
            delay = due - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
        await send(message)

    return held


async def _plain(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(payload)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": payload})
