"""One local HTTP server for both sandbox APIs.

    /lgc/...                    the LetsGetChecked sandbox (etl.sandbox.lgc)
    /rupa/...                   the Rupa Health sandbox   (etl.sandbox.rupa)
    GET/POST /_sandbox/{vendor}/faults   read / change that vendor's fault switches
    POST /_sandbox/{vendor}/reset        switch every fault off
    GET  /_sandbox/lgc/traffic           order PUTs seen: in flight now, the most at once, start times
    GET  /_sandbox/lgc/counts            per clientOrderId: PUTs received and orders created (never > 1)
    GET/POST /_sandbox/rupa/events       where and how Rupa events are sent (url, duplicates, reorder, hold, secret)
    POST /_sandbox/rupa/orders/{id}      move an order on: {"status": "In Progress"}, {"results": true} (id "latest" works)
    GET/POST /_sandbox/lgc/lifecycle     LetsGetChecked after the PUT: automatic steps, webhook
                                         URL and key, duplicates/reorder/drop switches
    POST /_sandbox/lgc/advance           move items on: {"client_order_id", "item_id", "steps", "to"}
    POST /_sandbox/lgc/letter            send a results letter: {"client_order_id", "audience": patient|pcp}
    GET  /_sandbox/health

Every request that reaches the server is recorded as it arrived on the wire, before any routing
or normalisation: `Sandbox.received` holds (method, raw path) pairs, e.g. ("PUT",
b"/lgc/DEMO/api/v2/orders/A%2FB"). Tests of path safety assert on it: a request that the client
stack re-routed shows up here under the path it really reached.

`SandboxServer` runs it in a background thread (tests, bench, demo); `serve()` runs it in the
foreground (`labsync sandbox`). It binds to 127.0.0.1 only (etl.asgi does the serving).
"""

from __future__ import annotations

import collections
import gc
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from etl import asgi
from etl.asgi import BackgroundServer
from etl.sandbox.faults import FaultMiddleware
from etl.sandbox.lgc import LgcSandbox
from etl.sandbox.rupa import RupaSandbox
from etl.settings import SANDBOX_HOST


class Sandbox:
    """The state of both sandboxes plus the ASGI app that serves them."""

    def __init__(self, lgc: LgcSandbox | None = None, rupa: RupaSandbox | None = None) -> None:
        self.lgc = lgc or LgcSandbox()
        self.rupa = rupa or RupaSandbox()
        self.received: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=100_000)

    def paths(self, method: str | None = None, prefix: bytes = b"") -> list[bytes]:
        """Raw paths received (optionally of one method, under one prefix), oldest first."""
        return [p for m, p in list(self.received)
                if (method is None or m == method) and p.startswith(prefix)]

    @classmethod
    def with_seed(cls, *, patients: int = 50, lab_tests: int = 20, seed: int = 0) -> Sandbox:
        """Both sandboxes, the Rupa one seeded with that many synthetic patients and lab tests."""
        return cls(rupa=RupaSandbox(patients=patients, lab_tests=lab_tests, seed=seed))

    def vendors(self) -> dict:
        return {"lgc": self.lgc, "rupa": self.rupa}

    def asgi(self) -> _Recorder:
        async def faults(request: Request):
            vendor = self.vendors().get(request.path_params["vendor"])
            if vendor is None:
                return JSONResponse({"error": "unknown vendor"}, status_code=404)
            if request.method == "POST":
                try:
                    vendor.faults.update(**(await request.json()))
                except (ValueError, TypeError) as exc:
                    return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse(vendor.faults.as_dict())

        async def reset(request: Request):
            vendor = self.vendors().get(request.path_params["vendor"])
            if vendor is None:
                return JSONResponse({"error": "unknown vendor"}, status_code=404)
            vendor.faults.reset()
            return JSONResponse(vendor.faults.as_dict())

        async def traffic(request: Request):
            return JSONResponse(self.lgc.traffic.snapshot())

        async def counts(request: Request):
            # what a test in another process (the e2e cluster) asserts "no order sent twice" on
            return JSONResponse({"put_count": dict(self.lgc.put_count),
                                 "accepted_count": dict(self.lgc.accepted_count)})

        async def lifecycle(request: Request):
            if request.method == "POST":
                try:
                    return JSONResponse(self.lgc.lifecycle.configure(**(await request.json())))
                except (ValueError, TypeError) as exc:
                    return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse(self.lgc.lifecycle.as_dict())

        async def advance(request: Request):
            try:
                raw = await request.body()
                args = json.loads(raw) if raw.strip() else {}
                moved = self.lgc.lifecycle.advance(
                    args.get("client_order_id"), args.get("item_id"),
                    steps=int(args.get("steps", 1)), to=args.get("to"))
            except KeyError:
                return JSONResponse({"error": "unknown clientOrderId"}, status_code=404)
            except (ValueError, TypeError, AttributeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse({"moved": moved})

        async def letter(request: Request):
            try:
                args = json.loads(await request.body() or b"{}")
                sent = self.lgc.lifecycle.send_letter(args["client_order_id"], args.get("audience", "patient"),
                                                      args.get("item_id"))
            except KeyError:
                return JSONResponse({"error": "unknown clientOrderId (or none given)"}, status_code=404)
            except (ValueError, TypeError, AttributeError, StopIteration) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse({"sent": sent})

        async def health(request: Request):
            return JSONResponse({"ok": True})

        async def oauth_callback(request: Request):
            # the local demo's RUPA_REDIRECT_URI: show what to paste into `labsync rupa authorize`
            return HTMLResponse("<h1>Rupa sandbox: access granted</h1><p>Copy this page's full URL "
                                "from the address bar and paste it into <code>labsync rupa authorize</code>.</p>")

        app = Starlette(
            routes=[
                Route("/_sandbox/health", health),
                Route("/oauth/callback", oauth_callback),
                Route("/_sandbox/rupa/events", self.rupa.checkout.control_events, methods=["GET", "POST"]),
                Route("/_sandbox/rupa/orders/{id}", self.rupa.checkout.control_order, methods=["POST"]),
                Route("/_sandbox/lgc/lifecycle", lifecycle, methods=["GET", "POST"]),
                Route("/_sandbox/lgc/advance", advance, methods=["POST"]),
                Route("/_sandbox/lgc/letter", letter, methods=["POST"]),
                Route("/_sandbox/{vendor}/faults", faults, methods=["GET", "POST"]),
                Route("/_sandbox/{vendor}/reset", reset, methods=["POST"]),
                Route("/_sandbox/lgc/traffic", traffic),
                Route("/_sandbox/lgc/counts", counts),
            ]
        )
        vendors = {
            # counted outside the faults, so added latency is time in flight
            "/lgc": self.lgc.traffic.counting(FaultMiddleware(self.lgc.app(), self.lgc.faults)),
            "/rupa": FaultMiddleware(self.rupa.app(), self.rupa.faults),
        }
        return _Recorder(_Mounts(vendors, app), self.received)


class _Mounts:
    """ASGI: `/lgc/...` and `/rupa/...` straight to the vendor apps, with the scope Starlette's
    Mount gives them, and everything else to the control app. The vendor traffic skips the
    control app's middleware and router (a third of the sandbox's CPU per order at
    concurrency 100, where the sandbox shares the cores with the loader it serves)."""

    def __init__(self, mounts: dict, app) -> None:
        self.mounts = [(prefix + "/", prefix, mounted) for prefix, mounted in mounts.items()]
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            root = scope.get("root_path", "")
            path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
            for head, prefix, mounted in self.mounts:
                if path.startswith(head):
                    child = {**scope, "path_params": dict(scope.get("path_params", {})),
                             "app_root_path": scope.get("app_root_path", root),
                             "root_path": root + prefix, "endpoint": mounted}
                    return await mounted(child, receive, send)
        return await self.app(scope, receive, send)


class _Recorder:
    """ASGI middleware: remember each HTTP request's method and raw path (query excluded)."""

    def __init__(self, app, received: collections.deque) -> None:
        self.app, self.received = app, received

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode()
            self.received.append((scope.get("method", ""), bytes(raw).split(b"?", 1)[0]))
        return await self.app(scope, receive, send)


class SandboxServer(BackgroundServer):
    """Run a `Sandbox` on 127.0.0.1 in a background thread. Use as a context manager."""

    def __init__(self, sandbox: Sandbox | None = None, *, port: int = 0) -> None:
        self.sandbox = sandbox or Sandbox()
        super().__init__(self.sandbox.asgi(), host=SANDBOX_HOST, port=port, name="labsync-sandbox")

    @property
    def lgc_url(self) -> str:
        return f"{self.url}/lgc"

    @property
    def rupa_url(self) -> str:
        return f"{self.url}/rupa"

    def stop(self) -> None:
        self.sandbox.lgc.lifecycle.stop()  # its thread moves items and sends webhooks
        for vendor in self.sandbox.vendors().values():
            vendor.faults.update(hang=False)  # let held requests end, or shutdown waits for them
        super().stop()


def serve(sandbox: Sandbox, host: str = SANDBOX_HOST, port: int = 8765) -> None:
    """Serve in the foreground until interrupted (`labsync sandbox`: a process of its own)."""
    gc.freeze()  # the seeded patients and lab tests live as long as the process
    asgi.serve(_FreezeEvery(sandbox.asgi()), host=host, port=port)


class _FreezeEvery:
    """The sandbox keeps everything it is sent (every order, for good), so Python's cyclic
    collector scans more and more of it, again and again: pauses that stall every request in
    flight, and the sandbox rather than the loader became the limit of bench/load.py at
    concurrency 100 (0.75-0.79 of concurrency/latency after a few thousand orders; 0.93 with
    the collector off). Every `every` requests, what exists is frozen out of the collector
    (`gc.freeze`). Only in the sandbox's own process (`serve`), never in a test's in-process
    server: a frozen cycle is never freed."""

    def __init__(self, app, every: int = 1000) -> None:
        self.app, self.every, self.seen = app, every, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.seen += 1
            if self.seen % self.every == 0:
                gc.freeze()
        return await self.app(scope, receive, send)
