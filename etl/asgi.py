"""Serving an ASGI app (the sandbox APIs, the webhook receiver) with uvicorn.

`BackgroundServer` runs an app on a loopback port in a daemon thread (tests, bench, demo): the
socket is bound before the thread starts, so `port` is known at once even when 0 was asked for.
`serve` runs an app in the foreground until interrupted (the CLI commands).

A server open to the network (the webhook receiver) is served with `Limits`: h11 as the HTTP
parser, with a cap on a request head's size (`MAX_HEAD_BYTES`, larger ones get 400); a deadline
for each request head (`HEAD_TIMEOUT` seconds from the connection's start or from the previous
answer, then the connection is closed: a client trickling its headers, or saying nothing, cannot
hold a connection); idle keep-alive connections closed after `KEEP_ALIVE_TIMEOUT`; and at most
`MAX_CONNECTIONS` connections at once (uvicorn's `limit_concurrency`: a request beyond it is
answered 503, which vendors retry). The body's own deadline is the app's (etl.webhooks.app).
An app declares its limits with `declare_limits`; `serve` uses them unless it is given others.
The sandbox declares none and is served as before (httptools, no limits): bench/load.py measures
it at 100 concurrent connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

try:  # the labsync[server] / labsync[sandbox] extra
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - tested in the wheel check (scripts/check-wheel.sh)
    from etl.extras import require

    require("server", "serving an app (the webhook receiver, the sandbox)")
    raise


MAX_CONNECTIONS = 100  # open connections at once; a request beyond them is answered 503
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
HEAD_TIMEOUT = 10.0  # seconds for a request's line and headers to arrive
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers larger than this are answered 400


@dataclass(frozen=True)
class Limits:
    """What a server open to the network holds (see the module's docstring)."""

    max_connections: int = MAX_CONNECTIONS
    keep_alive_timeout: int = KEEP_ALIVE_TIMEOUT
    head_timeout: float = HEAD_TIMEOUT
    max_head_bytes: int = MAX_HEAD_BYTES

    def uvicorn_options(self) -> dict[str, Any]:
        protocol = type("HeadDeadlineH11Protocol", (_HeadDeadlineH11Protocol,), {"head_timeout": self.head_timeout})
        return dict(http=protocol, limit_concurrency=self.max_connections,
                    timeout_keep_alive=self.keep_alive_timeout,
                    h11_max_incomplete_event_size=self.max_head_bytes)


_LIMITS_ATTRIBUTE = "labsync_server_limits"


def declare_limits(app: Any, limits: Limits) -> None:
    """Record on `app` the limits it is to be served with (an attribute of its `state`)."""
    setattr(app.state, _LIMITS_ATTRIBUTE, limits)


def declared_limits(app: Any) -> Limits | None:
    value = getattr(getattr(app, "state", None), _LIMITS_ATTRIBUTE, None)
    return value if isinstance(value, Limits) else None


class _HeadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head: armed when the
    connection opens and after each answer, cleared when the next request's head has arrived.
    uvicorn alone arms no timer before a first request, and its keep-alive timer restarts on
    every byte received, so a client sending a byte now and then would hold the connection."""

    head_timeout: float = HEAD_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None
    _armed_for: object = None  # the request cycle current when the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._armed_for:  # a new request's head arrived
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._armed_for = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is self._armed_for and idle and not self.transport.is_closing():
            self.transport.close()  # connection_lost tells h11


def quiet_uvicorn() -> None:
    """Dropped connections and bad requests are expected here; their tracebacks would bury
    the useful output (and could carry request data)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class BackgroundServer:
    """Run `app` on `host:port` in a background thread. Use as a context manager."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, name: str = "labsync-asgi",
                 limits: Limits | None = None) -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        options: dict[str, Any] = {"timeout_keep_alive": 30}
        if limits is not None:  # only when asked: the test receivers keep connections 30 s
            options.update(limits.uvicorn_options())
        config = uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off", **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name=name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self):
        quiet_uvicorn()
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(app, *, host: str, port: int, limits: Limits | None = None) -> None:
    """Serve in the foreground until interrupted, with `limits` (else those the app declares,
    else none)."""
    limits = limits if limits is not None else declared_limits(app)
    options = limits.uvicorn_options() if limits is not None else {}
    quiet_uvicorn()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", **options)
