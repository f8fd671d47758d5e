"""Serving an ASGI app (the sandbox APIs, the webhook receiver) with uvicorn.

`BackgroundServer` runs an app on a loopback port in a daemon thread (tests, bench, demo): the
socket is bound before the thread starts, so `port` is known at once even when 0 was asked for.
`serve` runs an app in the foreground until interrupted (the CLI commands).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

try:  # the labsync[server] / labsync[sandbox] extra
    import uvicorn
except ImportError:  # pragma: no cover - tested in the wheel check (scripts/check-wheel.sh)
    from etl.extras import require

    require("server", "serving an app (the webhook receiver, the sandbox)")
    raise


def quiet_uvicorn() -> None:
    """Dropped connections and bad requests are expected here; their tracebacks would bury
    the useful output (and could carry request data)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class BackgroundServer:
    """Run `app` on `host:port` in a background thread. Use as a context manager."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, name: str = "labsync-asgi") -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="critical", access_log=False,
                                timeout_keep_alive=30, lifespan="off")
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


def serve(app, *, host: str, port: int) -> None:
    """Serve in the foreground until interrupted."""
    quiet_uvicorn()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
