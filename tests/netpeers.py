"""Real network peers on loopback for tests: a forward proxy, a relay that sends 1xx interim
answers, an HTTPS relay that checks client certificates, and a plain echo server.

Every peer listens on 127.0.0.1 on a free port chosen by the kernel, serves from a background
thread (an asyncio loop in a thread; `EchoServer`: `http.server` threads), is a context manager
(`with ForwardProxy() as proxy:` starts it, leaving the block stops it and closes every socket and
thread it opened), has `.url`, `.port`, `.connections` (client connections accepted) and records
what it saw in lists that other threads may read (`list(peer.seen)` for a snapshot). The asyncio
peers also keep `.errors` (tracebacks of unexpected exceptions; a test can assert it is empty);
`wait_until(predicate)` polls for counters a peer updates just after the client got its answer.

- `ForwardProxy()`: an HTTP/1.1 forward proxy. Absolute-form requests (`GET http://host:port/x
  HTTP/1.1`, any method, Content-Length or chunked request bodies, keep-alive) are relayed to
  the origin over a kept-alive connection and the answer streamed back as it came (status line,
  headers, body framed by Content-Length, chunked or the end of the connection); `CONNECT
  host:port` opens a tunnel. `.seen`: `(method, target)` tuples, e.g. `("PUT",
  "http://127.0.0.1:8765/lgc/DEMO/api/v2/orders/X")` or `("CONNECT", "127.0.0.1:8443")`;
  `.hosts()`: the set of `"host:port"` it was asked to reach. Only loopback origins are reached
  (others get 403 without any DNS look-up) and a request aimed at the proxy itself gets 508.
  httpx uses it with `httpx.Client(proxy=proxy.url)` or from `HTTP_PROXY`/`HTTPS_PROXY` (the
  default `trust_env=True`). httpx (0.29, installed) reads `NO_PROXY=127.0.0.1` as "go straight to
  127.0.0.1" (an `all://127.0.0.1` mount without proxy, any port): the proxy sees nothing. An
  entry `localhost` does not cover 127.0.0.1, nor does a CIDR entry like `127.0.0.0/8`.
- `InterimRelay(upstream, interim)`: a reverse relay in front of `upstream` (a plain-HTTP base
  URL, e.g. the sandbox's). For each request it first writes the given 1xx answers (`[b"HTTP/1.1
  100 Continue\\r\\n\\r\\n"]`), each flushed on its own, waits ~5 ms, then forwards the request
  (Host rewritten to the upstream's, path prefixed by the upstream URL's path if it has one) and
  relays the final answer. One request at a time per client connection, in order. `.count`:
  requests relayed (counted when the upstream's final answer arrives, before the client gets
  it); `.seen`: `(method, target)` as the client sent them.
- `make_tls(dirpath) -> TlsFiles`: a CA, a server certificate for 127.0.0.1 and localhost, a
  client certificate (CN "labsync-test-client") from the CA, and another client certificate
  from another, self-signed CA (`other_*`), all PEM files. `TlsFiles.client_context()` builds
  the `ssl.SSLContext` httpx takes as `verify=`.
- `TlsRelay(upstream, tls, require_client_cert=True)`: the same relay (no interims) behind TLS,
  `.url` is "https://127.0.0.1:PORT". It asks for a client certificate that the CA signed
  (`ssl.CERT_REQUIRED`; with `require_client_cert=False` it asks for none). `.client_subjects`:
  the CN of the client certificate of each accepted connection; `.refused`: TLS handshakes
  that failed (no or wrong client certificate, a client that distrusts the server, plain HTTP).
  With TLS 1.3 the client finishes its handshake before the server checks the certificate, so
  httpx reports a refused certificate on its first read (`httpx.ReadError`, sometimes
  `ConnectError`/`RemoteProtocolError`) rather than always as `ConnectError`.
- `EchoServer()`: `http.server` (threads, HTTP/1.1 keep-alive) that answers every method with
  JSON `{"method", "path", "headers", "body"}` and Content-Length. Query `_frame=chunked` answers
  chunked, `_frame=close` without length and closes the connection; `_status=204` (any code)
  answers that status (no body for 1xx/204/304). `.seen`: `(method, path)`.

Limits that keep tests from hanging: a connection idle for 60 s is closed, an upstream has 5 s to
accept and 30 s per read, a connection serves at most 10 000 requests, request heads are at most
1 MiB and request bodies at most 64 MiB. No HTTP/2, no `Upgrade`/101 relaying, no https://
absolute-form through the proxy (clients use CONNECT for https).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"

_HEAD_LIMIT = 1 << 20
_MAX_BODY = 64 << 20
_MAX_REQUESTS = 10_000
_IDLE_TIMEOUT = 60.0
_IO_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 5.0
_HANDSHAKE_TIMEOUT = 5.0
_PIECE = 65536
_INTERIM_PAUSE = 0.005

# Headers about one connection (RFC 9110 7.6.1); the proxy does not forward them. Transfer-Encoding
# is kept: bodies are relayed in the framing they came in.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}
)
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def wait_until(
    predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.005
) -> bool:
    """Polls `predicate` until it is true or `timeout` passes; returns its last value. For counters
    a peer updates on its own thread just after the client has its answer (e.g. `.refused`)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# HTTP/1.1 messages on asyncio streams


class _BadMessage(Exception):
    """The client sent something that is not HTTP/1.1: it gets 400 and the connection ends."""


class _UpstreamError(Exception):
    """The upstream could not be reached or answered nothing; nothing was sent to the client yet."""


@dataclass
class _Head:
    start: str  # the request line or the status line
    headers: list[tuple[str, str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> set[str]:
        value = self.get(name)
        return {t.strip().lower() for t in value.split(",")} if value else set()


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":  # obsolete line folding
            if not headers:
                raise _BadMessage("folded line before any header")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadMessage(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    return _Head(lines[0], headers, raw)


async def _read_head(reader: asyncio.StreamReader, timeout: float) -> _Head | None:
    """The next message head, or None when the peer closed the connection between messages."""
    for _ in range(8):  # stray empty lines between messages are allowed (RFC 9112 2.2)
        try:
            raw = await _within(timeout, reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip(b"\r\n"):
                raise _BadMessage("connection closed in the middle of a head") from exc
            return None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise _BadMessage("head too large") from exc
        raw = raw.lstrip(b"\r\n")
        if raw:
            return _parse_head(raw if raw.endswith(b"\r\n\r\n") else raw + b"\r\n")
    raise _BadMessage("too many empty lines")


def _head_bytes(start: str, headers: list[tuple[str, str]]) -> bytes:
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode(
        "latin-1"
    )


def _request_line(head: _Head) -> tuple[str, str, str]:
    parts = head.start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadMessage(f"bad request line {head.start!r}")
    return parts[0], parts[1], parts[2]


def _status_line(head: _Head) -> tuple[str, int]:
    version, _, rest = head.start.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ConnectionError(f"upstream sent a bad status line {head.start!r}")
    return version, int(code)


def _framing(head: _Head, *, method: str, status: int | None = None) -> tuple[str, int]:
    """How the body of `head` ends: ("none"|"chunked"|"close", 0) or ("length", n). `status` is
    None for a request."""
    if status is not None and (100 <= status < 200 or status in (204, 304) or method == "HEAD"):
        return ("none", 0)
    te = head.tokens("transfer-encoding")
    if te:
        if "chunked" in te:
            return ("chunked", 0)
        if status is None:
            raise _BadMessage("a request body must be chunked or have a Content-Length")
        return ("close", 0)
    length = head.get("content-length")
    if length is not None:
        values = {v.strip() for v in length.split(",")}
        value = values.pop()
        if values or not value.isdigit():
            if status is None:
                raise _BadMessage(f"bad Content-Length {length!r}")
            raise ConnectionError(f"upstream sent a bad Content-Length {length!r}")
        return ("length", int(value))
    return ("none", 0) if status is None else ("close", 0)


async def _within(seconds: float, awaitable):
    # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives as the
    # awaited thing ends (then a stopping peer's handler carries on); asyncio.timeout cannot.
    async with asyncio.timeout(seconds):
        return await awaitable


async def _timed(awaitable):
    return await _within(_IO_TIMEOUT, awaitable)


async def _iter_body(
    reader: asyncio.StreamReader, framing: tuple[str, int]
) -> AsyncIterator[bytes]:
    """The body's bytes as they are on the wire (chunk sizes and trailers included)."""
    kind, length = framing
    if kind == "length":
        while length:
            data = await _timed(reader.read(min(length, _PIECE)))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(data)
            yield data
    elif kind == "close":
        while data := await _timed(reader.read(_PIECE)):
            yield data
    elif kind == "chunked":
        while True:
            line = await _timed(reader.readuntil(b"\r\n"))
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BadMessage(f"bad chunk size line {line!r}") from exc
            if size < 0:
                raise _BadMessage(f"bad chunk size line {line!r}")
            if size == 0:  # the last chunk, then trailers up to an empty line
                tail = line
                while (part := await _timed(reader.readuntil(b"\r\n"))) != b"\r\n":
                    tail += part
                    if len(tail) > _HEAD_LIMIT:
                        raise _BadMessage("trailers too large")
                yield tail + b"\r\n"
                return
            yield line
            while size:
                data = await _timed(reader.read(min(size, _PIECE)))
                if not data:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(data)
                yield data
            if await _timed(reader.readexactly(2)) != b"\r\n":
                raise _BadMessage("chunk data not followed by CRLF")
            yield b"\r\n"


async def _read_body(reader: asyncio.StreamReader, head: _Head) -> bytes:
    """A request's whole body as it was on the wire."""
    framing = _framing(head, method="")
    if framing[0] == "length" and framing[1] > _MAX_BODY:
        raise _BadMessage("request body too large")
    parts, size = [], 0
    async for part in _iter_body(reader, framing):
        size += len(part)
        if size > _MAX_BODY:
            raise _BadMessage("request body too large")
        parts.append(part)
    return b"".join(parts)


def _client_keeps_alive(head: _Head, version: str) -> bool:
    tokens = head.tokens("connection") | head.tokens("proxy-connection")
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _simple_answer(status: int, reason: str, text: str) -> bytes:
    body = (text + "\n").encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return _head_bytes(f"HTTP/1.1 {status} {reason}", headers) + body


async def _close_writer(writer: asyncio.StreamWriter, *, hard: bool = False) -> None:
    if hard:
        writer.transport.abort()
        return
    writer.close()
    try:
        await _within(1.0, writer.wait_closed())
    except (OSError, TimeoutError, ssl.SSLError):
        writer.transport.abort()


class _Upstream:
    """One kept-alive connection to an origin, opened again when it was closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> bool:
        """Connects if need be; returns whether an existing connection is reused."""
        if self.writer is not None and (self.writer.is_closing() or self.reader.at_eof()):
            await self.close()
        if self.writer is not None:
            return True
        try:
            self.reader, self.writer = await _within(
                _CONNECT_TIMEOUT, asyncio.open_connection(self.host, self.port, limit=_HEAD_LIMIT)
            )
        except (OSError, TimeoutError) as exc:
            raise _UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        return False

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            await _close_writer(writer)


# --------------------------------------------------------------------------------------------
# The peers on an asyncio loop


class _AsyncPeer:
    """An asyncio server on 127.0.0.1 in a thread of its own; subclasses implement `_serve`."""

    scheme = "http"

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.seen: list[tuple[str, str]] = []
        self.connections = 0
        self.errors: list[str] = []  # unexpected exceptions in the peer (tracebacks)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def _record(self, method: str, target: str) -> None:
        with self._lock:
            self.seen.append((method, target))

    # life cycle

    def start(self):
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"netpeers-{type(self).__name__}", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        if self._start_error is not None or not self.port:
            self._thread.join(10)
            self._thread = None
            raise RuntimeError(f"{type(self).__name__} did not start") from self._start_error
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(event.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} did not stop within 10 s")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._start_error = exc
        finally:
            ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(
            self._on_connection, self.host, 0, limit=_HEAD_LIMIT, backlog=512
        )
        try:
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self._stop_event.wait()
        finally:
            self._stopping = True
            # Stop accepting first and let connections accepted just now reach _on_connection:
            # on Python 3.11 one accepted after server.close() leaks its socket (Server._attach
            # fails and asyncio drops the connection without closing it).
            loop = asyncio.get_running_loop()
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
            await asyncio.sleep(0.005)
            server.close()
            me = asyncio.current_task()
            for _ in range(50):  # handlers end on cancellation; a stray one is cancelled again
                handlers = [t for t in self._tasks if not t.done()]
                targets = handlers or [t for t in asyncio.all_tasks() if t is not me]
                if not targets:
                    break
                for task in targets:
                    task.cancel()
                await asyncio.wait(targets, timeout=0.2)
            for writer in list(self._writers):  # connections whose handler never ran
                writer.transport.abort()
            await server.wait_closed()
            await asyncio.sleep(0.01)  # aborted transports close their sockets on the next turns

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Not a coroutine: the writer is known at once, even if the loop stops before the
        # handler runs.
        self._writers.add(writer)
        with self._lock:
            self.connections += 1
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )
            if await self._accept(reader, writer):
                await self._serve(reader, writer)
        except _BadMessage as exc:
            with contextlib.suppress(Exception):
                writer.write(_simple_answer(400, "Bad Request", str(exc)))
                await _within(1.0, writer.drain())
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: just close
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - kept for the test to see
            with self._lock:
                self.errors.append(traceback.format_exc())
        finally:
            self._writers.discard(writer)
            await _close_writer(writer, hard=self._stopping)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Runs before the first request (TLS handshake); False ends the connection."""
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    # relaying one exchange

    async def _exchange(
        self,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        on_final: Callable[[], None] | None = None,
    ) -> bool:
        """Sends one request to `upstream` and streams its answer (1xx answers included) to the
        client. Returns whether the client connection may serve another request. Raises
        `_UpstreamError` if nothing could be sent to the client."""
        data = _head_bytes(f"{method} {path} HTTP/1.1", headers) + body
        for attempt in range(2):
            reused = await upstream.open()
            try:
                upstream.writer.write(data)
                await _timed(upstream.writer.drain())
                head = await _read_head(upstream.reader, _IO_TIMEOUT)
                if head is None:
                    raise ConnectionResetError("the upstream closed the connection")
                break
            except (OSError, asyncio.IncompleteReadError, _BadMessage) as exc:
                await upstream.close()
                if reused and attempt == 0 and not isinstance(exc, TimeoutError):
                    continue  # a kept-alive connection the upstream had closed meanwhile
                raise _UpstreamError(
                    f"no answer from {upstream.host}:{upstream.port}: {exc!r}"
                ) from exc
        version, status = _status_line(head)
        for _ in range(100):
            if not 100 <= status < 200 or status == 101:
                break
            writer.write(head.raw)
            await _timed(writer.drain())
            head = await _read_head(upstream.reader, _IO_TIMEOUT)
            if head is None:
                raise ConnectionResetError("the upstream closed the connection after a 1xx answer")
            version, status = _status_line(head)
        else:
            raise ConnectionError("the upstream sent more than 100 interim answers")
        if on_final is not None:
            on_final()
        framing = _framing(head, method=method, status=status)
        upstream_keeps = (
            version == "HTTP/1.1"
            and "close" not in head.tokens("connection")
            and framing[0] != "close"
        )
        keep_alive = keep_alive and framing[0] != "close"
        out = [(k, v) for k, v in head.headers if k.lower() not in _HOP_BY_HOP]
        if not keep_alive:
            out.append(("Connection", "close"))
        writer.write(_head_bytes(head.start, out))
        async for piece in _iter_body(upstream.reader, framing):
            writer.write(piece)
            await _timed(writer.drain())
        await _timed(writer.drain())
        if not upstream_keeps:
            await upstream.close()
        return keep_alive


class ForwardProxy(_AsyncPeer):
    """An HTTP/1.1 forward proxy on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, loopback_only: bool = True) -> None:
        super().__init__()
        self.loopback_only = loopback_only

    def hosts(self) -> set[str]:
        """The `"host:port"` of every origin asked for (absolute-form requests and CONNECT)."""
        found = set()
        with self._lock:
            seen = list(self.seen)
        for method, target in seen:
            if method == "CONNECT":
                found.add(target)
            else:
                parts = urlsplit(target)
                if parts.hostname:
                    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
                    found.add(f"{host}:{parts.port or 80}")
        return found

    def _refusal(self, host: str, port: int) -> bytes | None:
        if self.loopback_only and not is_loopback_host(host):
            return _simple_answer(403, "Forbidden", f"netpeers proxy: {host} is not loopback")
        if port == self.port and is_loopback_host(host):
            return _simple_answer(508, "Loop Detected", "netpeers proxy: that is the proxy itself")
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: _Upstream | None = None
        try:
            for _ in range(_MAX_REQUESTS):
                head = await _read_head(reader, _IDLE_TIMEOUT)
                if head is None or self._stopping:
                    return
                method, target, version = _request_line(head)
                self._record(method, target)
                if method == "CONNECT":
                    await self._tunnel(reader, writer, target)
                    return
                parts = urlsplit(target)
                if parts.scheme.lower() != "http" or not parts.hostname:
                    writer.write(
                        _simple_answer(
                            400,
                            "Bad Request",
                            "netpeers proxy: send http:// absolute-form or CONNECT",
                        )
                    )
                    return
                try:
                    port = parts.port or 80
                except ValueError as exc:
                    raise _BadMessage(f"bad port in {target!r}") from exc
                refusal = self._refusal(parts.hostname, port)
                if refusal is not None:
                    writer.write(refusal)
                    return
                rest = target[len(parts.scheme) + 3 + len(parts.netloc) :]
                path = rest if rest.startswith("/") else "/" + rest
                if "100-continue" in head.tokens("expect"):  # the proxy itself says go on
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await _timed(writer.drain())
                body = await _read_body(reader, head)
                named = head.tokens("connection")
                headers = [
                    (k, v)
                    for k, v in head.headers
                    if k.lower() not in _HOP_BY_HOP
                    and k.lower() not in named
                    and k.lower() != "expect"
                ]
                if not any(k.lower() == "host" for k, _ in headers):
                    headers.insert(0, ("Host", parts.netloc))
                if upstream is None or (upstream.host, upstream.port) != (parts.hostname, port):
                    if upstream is not None:
                        await upstream.close()
                    upstream = _Upstream(parts.hostname, port)
                try:
                    keep = await self._exchange(
                        writer,
                        upstream,
                        method,
                        path,
                        headers,
                        body,
                        _client_keeps_alive(head, version),
                    )
                except _UpstreamError as exc:
                    writer.write(_simple_answer(502, "Bad Gateway", f"netpeers proxy: {exc}"))
                    return
                if not keep:
                    return
        finally:
            if upstream is not None:
                await upstream.close()

    async def _tunnel(self, reader, writer, target: str) -> None:
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            raise _BadMessage(f"CONNECT needs host:port, not {target!r}")
        host, port = host.strip("[]"), int(port_text)
        refusal = self._refusal(host, port)
        if refusal is not None:
            writer.write(refusal)
            return
        try:
            up_reader, up_writer = await _within(
                _CONNECT_TIMEOUT, asyncio.open_connection(host, port, limit=_HEAD_LIMIT)
            )
        except (OSError, TimeoutError) as exc:
            writer.write(_simple_answer(502, "Bad Gateway", f"netpeers proxy: {exc!r}"))
            return
        try:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await _timed(writer.drain())
            await _pipe(reader, writer, up_reader, up_writer)
        finally:
            await _close_writer(up_writer, hard=self._stopping)


async def _pipe(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copies bytes both ways until both sides have ended (or either side fails)."""

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await _within(_IDLE_TIMEOUT, src.read(_PIECE)):
            dst.write(data)
            await _timed(dst.drain())
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()

    tasks = [
        asyncio.ensure_future(copy(a_reader, b_writer)),
        asyncio.ensure_future(copy(b_reader, a_writer)),
    ]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Relay(_AsyncPeer):
    """A reverse relay: every request goes to the plain-HTTP `upstream`."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        if not is_loopback_host(parts.hostname):
            raise ValueError(f"upstream must be on loopback, not {parts.hostname!r}")
        self.upstream = upstream.rstrip("/")
        self.count = 0
        self._up_host, self._up_port = parts.hostname, parts.port or 80
        self._up_netloc = parts.netloc
        self._up_prefix = parts.path.rstrip("/")

    def _count_one(self) -> None:
        with self._lock:
            self.count += 1

    async def _before_forward(self, writer: asyncio.StreamWriter) -> None:
        """Runs after a request's head arrived, before its body is read."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = _Upstream(self._up_host, self._up_port)
        try:
            for _ in range(_MAX_REQUESTS):
                head = await _read_head(reader, _IDLE_TIMEOUT)
                if head is None or self._stopping:
                    return
                method, target, version = _request_line(head)
                self._record(method, target)
                await self._before_forward(writer)
                body = await _read_body(reader, head)
                path = target
                if "://" in target:  # absolute-form sent to a server: keep path and query
                    parts = urlsplit(target)
                    rest = target[len(parts.scheme) + 3 + len(parts.netloc) :]
                    path = rest if rest.startswith("/") else "/" + rest
                if path != "*":
                    path = self._up_prefix + path
                headers = [("Host", self._up_netloc)] + [
                    (k, v) for k, v in head.headers if k.lower() != "host"
                ]
                try:
                    keep = await self._exchange(
                        writer,
                        upstream,
                        method,
                        path,
                        headers,
                        body,
                        _client_keeps_alive(head, version),
                        on_final=self._count_one,
                    )
                except _UpstreamError as exc:
                    writer.write(_simple_answer(502, "Bad Gateway", f"netpeers relay: {exc}"))
                    return
                if not keep:
                    return
        finally:
            await upstream.close()


class InterimRelay(_Relay):
    """A reverse relay that answers every request with `interim` (raw 1xx answers, each ending
    in an empty line) before the upstream's final answer (see the module docstring)."""

    def __init__(self, upstream: str, interim: list[bytes]) -> None:
        super().__init__(upstream)
        for answer in interim:
            if not (answer.startswith(b"HTTP/1.1 1") and answer.endswith(b"\r\n\r\n")):
                raise ValueError(f"not a 1xx answer ending in an empty line: {answer!r}")
        self.interim = list(interim)

    async def _before_forward(self, writer: asyncio.StreamWriter) -> None:
        for answer in self.interim:
            writer.write(answer)
            await _timed(writer.drain())
        await asyncio.sleep(_INTERIM_PAUSE)


# --------------------------------------------------------------------------------------------
# TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made by `make_tls`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by `other_ca_cert`, a CA the servers do not trust
    other_client_key: Path
    other_ca_cert: Path

    def client_context(self, cert: str | None = "client") -> ssl.SSLContext:
        """A client context trusting the CA, presenting the client certificate (`cert="client"`),
        the other CA's one (`"other"`) or none (`None`). For `httpx.Client(verify=...)`."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if cert == "client":
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        elif cert == "other":
            context.load_cert_chain(str(self.other_client_cert), str(self.other_client_key))
        elif cert is not None:
            raise ValueError(f"cert must be 'client', 'other' or None, not {cert!r}")
        return context

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.ca_cert))
        return context


CLIENT_CN = "labsync-test-client"


def make_tls(dirpath: str | Path) -> TlsFiles:
    """Writes a CA, a server certificate (127.0.0.1, localhost), a client certificate (CN
    `CLIENT_CN`) and a client certificate from another self-signed CA into `dirpath`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(dirpath)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labsync tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    def certificate(cn, key, issuer_name, issuer_key, *, ca=False, sans=None, purpose=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
            )
            .add_extension(usage(ca=ca), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if purpose:
            builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(filename: str, cert=None, key=None) -> Path:
        path = directory / filename
        if cert is not None:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        else:
            path.touch(mode=0o600)
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return path

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_ca_key = new_key(), new_key()
    ca = certificate("labsync test CA", ca_key, name("labsync test CA"), ca_key, ca=True)
    other_ca = certificate(
        "labsync other CA", other_ca_key, name("labsync other CA"), other_ca_key, ca=True
    )
    server_key, client_key, other_key = new_key(), new_key(), new_key()
    server = certificate(
        "127.0.0.1",
        server_key,
        ca.subject,
        ca_key,
        sans=[x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")],
        purpose=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = certificate(
        CLIENT_CN, client_key, ca.subject, ca_key, purpose=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other = certificate(
        CLIENT_CN,
        other_key,
        other_ca.subject,
        other_ca_key,
        purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return TlsFiles(
        ca_cert=write("ca.pem", cert=ca),
        server_cert=write("server.pem", cert=server),
        server_key=write("server.key", key=server_key),
        client_cert=write("client.pem", cert=client),
        client_key=write("client.key", key=client_key),
        other_client_cert=write("other-client.pem", cert=other),
        other_client_key=write("other-client.key", key=other_key),
        other_ca_cert=write("other-ca.pem", cert=other_ca),
    )


def _common_name(peercert: dict) -> str | None:
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class TlsRelay(_Relay):
    """An HTTPS reverse relay on 127.0.0.1 in front of a plain-HTTP upstream, asking for a client
    certificate from `tls.ca_cert` (see the module docstring)."""

    scheme = "https"

    def __init__(self, upstream: str, tls: TlsFiles, require_client_cert: bool = True) -> None:
        super().__init__(upstream)
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.client_subjects: list[str | None] = []
        self.refused = 0
        self.handshake_errors: list[str] = []
        self._context = tls.server_context(require_client_cert)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        # First thing on the connection, before anything was read: the ClientHello is still in
        # the socket when the transport switches to TLS.
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError, EOFError, ConnectionError) as exc:
            with self._lock:
                self.refused += 1
                self.handshake_errors.append(repr(exc))
            return False
        peercert = writer.get_extra_info("peercert")
        if peercert:
            with self._lock:
                self.client_subjects.append(_common_name(peercert))
        return True


# --------------------------------------------------------------------------------------------
# A plain echo server (http.server threads)


class _EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(), after their sockets are shut down
    block_on_close = True
    request_queue_size = 512  # socketserver's 5 drops connections a relay opens at once

    def __init__(self, peer: EchoServer) -> None:
        self.peer = peer
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__((LOOPBACK, 0), _EchoHandler)

    def process_request(self, request, client_address):
        with self.sockets_lock:
            self.open_sockets.add(request)
        with self.peer._lock:
            self.peer.connections += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def shut_open_sockets(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection ends after this
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK wait
    server: _EchoHTTPServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self) -> None:
        body = self._read_body()
        peer = self.server.peer
        with peer._lock:
            peer.seen.append((self.command, self.path))
        query = parse_qs(urlsplit(self.path).query)
        status = int(query.get("_status", ["200"])[0])
        frame = query.get("_frame", ["length"])[0]
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        no_body = 100 <= status < 200 or status in (204, 304)
        self.send_response(status)
        if no_body:
            self.end_headers()
            return
        self.send_header("Content-Type", "application/json")
        if frame == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        elif frame == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if frame == "chunked":
            half = len(payload) // 2
            for part in (payload[:half], payload[half:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _answer


class EchoServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that echoes each request as JSON (see the module
    docstring)."""

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.seen: list[tuple[str, str]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._server: _EchoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EchoServer:
        if self._server is not None:
            raise RuntimeError("EchoServer already started")
        self._server = _EchoHTTPServer(self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="netpeers-EchoServer",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        self._thread.join(10)
        server.shut_open_sockets()  # wakes the threads waiting on kept-alive connections
        server.server_close()  # joins them

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
