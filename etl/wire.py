"""A thin HTTP/1.1 transport for the loader's hot path: one keep-alive connection, one request
at a time, parsed by httptools (the C parser uvicorn uses), behind httpx's transport interface.

Why: at hundreds of orders a second the loader is CPU-bound in one process, and more than half
of its CPU per order went to the layers between httpx and the socket (httpcore's pool and
connection state machines, h11's per-event header validation, anyio's cancel scopes around
every read and write). This transport does what those layers did for a PUT on a connection of
its own, and nothing else:

- `handle_async_request(httpx.Request) -> httpx.Response` like any httpx transport, the body a
  stream read as it arrives (reading pauses while the caller has not taken what came), so
  etl.http.aread_capped, content decoding and everything above work as with httpx's own.
- `send_capped(request, limit)`: the same as `aread_capped(await handle_async_request(...))`,
  by the same rules (etl.http.unread_verdict, CappedBody, capped_response), in one step
  without the streamed response in between (the loader's path: etl.lgc.client).
- Timeouts from the request's `timeout` extension, as httpx applies them: `connect` for the
  TCP (and TLS) set-up, `write` for the request to leave, `read` for each wait for data.
- Errors are httpx's own: ConnectError/ConnectTimeout, WriteError/WriteTimeout,
  ReadError/ReadTimeout, RemoteProtocolError (a malformed answer, or the server closing before
  the answer was complete), LocalProtocolError (a header holding a line break is never sent),
  UnsupportedProtocol; the retry policy (etl.http) and the breaker see what they saw before.
  One difference: an answer with two Content-Length headers is malformed here (llhttp), where
  h11 takes two equal ones as one; RFC 9112 allows either.
- The request head and body go out in one write (httpcore wrote them separately).
- A connection is reused only after a complete answer the server lets us keep alive; an answer
  not read to its end, an error, or a cancellation closes it, and the next request opens a new
  one. No proxies, no HTTP/2, no pool: the loader gives each worker its own transport.

`available()` says whether httptools is importable; without it the loader falls back to
httpx's own transport (same behaviour, more CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httpx

from etl.http import CappedBody, aread_capped, capped_response, unread_verdict

try:
    import httptools
except ImportError:  # pragma: no cover - httptools comes with labsync's dependencies
    httptools = None

HIGH_WATER = 256 << 10  # answer bytes buffered before reading pauses until the caller takes them
_BAD_HEADER = re.compile(rb"[\r\n\0]")
_EXTENSIONS = {"http_version": b"HTTP/1.1"}


def available() -> bool:
    return httptools is not None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the parse state of the answer in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the peer hung up (EOF) or the connection was lost
        self.lost: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._can_write = True
        self._write_waiter: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.framed = False  # content-length or chunked: EOF before the end is an error

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask for an upgrade
            self.error = httpx.RemoteProtocolError("the server switched protocols")
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed HTTP answer ({exc})")
        if self.error is not None and self.transport is not None:
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()
        self._can_write = True
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    # ---- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                self.framed = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # (the parser forgets it afterwards)

    # ---- waiting ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until data, EOF or an error arrives; httpx.ReadTimeout after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def drain(self, timeout: float | None) -> None:
        if self._can_write:
            return
        loop = asyncio.get_running_loop()
        self._write_waiter = waiter = loop.create_future()
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise httpx.WriteTimeout("timed out sending the request") from None
        finally:
            self._write_waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the answer"))


class _Body(httpx.AsyncByteStream):
    """The answer's body as it arrives; closing it before the end drops the connection."""

    def __init__(self, owner: WireTransport, conn: _Connection, read_timeout: float | None) -> None:
        self._owner, self._conn, self._timeout = owner, conn, read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.buffered <= HIGH_WATER and conn.transport is not None and not conn.closed:
                    conn.transport.resume_reading()
                yield chunk
                continue
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                self._done = True
                return
            if conn.closed:
                if conn.framed or conn.lost is not None:
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection before the answer was complete")
                self._done = True  # a body delimited by the end of the connection
                return
            await conn.wait(self._timeout)

    async def aclose(self) -> None:
        self._owner._finished(self._conn, reusable=self._done and self._conn.complete)


class WireTransport(httpx.AsyncBaseTransport):
    """One keep-alive HTTP/1.1 connection, one request at a time (see the module docstring)."""

    def __init__(self, *, verify: ssl.SSLContext | None = None) -> None:
        if httptools is None:  # pragma: no cover
            raise RuntimeError("httptools is not installed")
        self._ssl = verify
        self._conn: _Connection | None = None
        self._key: tuple[str, str, int] | None = None
        self._busy = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        conn = await self._exchange(request)
        read = (request.extensions.get("timeout") or {}).get("read")
        return httpx.Response(conn.parser.get_status_code(), headers=conn.headers,
                              stream=_Body(self, conn, read), extensions=dict(_EXTENSIONS))

    async def send_capped(self, request: httpx.Request, limit: int) -> httpx.Response:
        """`etl.http.aread_capped(await handle_async_request(request), request, limit)` in one
        step, without the streamed response in between: the same rules (etl.http.unread_verdict,
        CappedBody) and the same complete response. An answer with a content coding (asked for
        none, sent anyway) goes the general way, so it is capped at its decoded size."""
        conn = await self._exchange(request)
        status, headers = conn.parser.get_status_code(), conn.headers
        length = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                read = (request.extensions.get("timeout") or {}).get("read")
                streamed = httpx.Response(status, headers=headers, stream=_Body(self, conn, read),
                                          extensions=_EXTENSIONS)
                return await aread_capped(streamed, request, limit)
            if lname == b"content-length":
                length = value if length is None else b"x"  # several: not a size (as httpx reads it)
        reusable = False
        try:
            over = unread_verdict(status, length, limit)
            if over is not None:  # settled without reading the body: the connection goes
                return capped_response(status, headers, request, b"", over, _EXTENSIONS)
            body = CappedBody(limit)
            stream = _Body(self, conn, (request.extensions.get("timeout") or {}).get("read"))
            async with contextlib.aclosing(stream.__aiter__()) as chunks:
                async for chunk in chunks:
                    if not body.add(chunk):
                        break
                else:
                    reusable = True
            over = body.size > body.limit
            return capped_response(status, headers, request, b"" if over else b"".join(body.chunks), over,
                                   _EXTENSIONS)
        finally:
            self._finished(conn, reusable=reusable)

    async def _exchange(self, request: httpx.Request) -> _Connection:
        """Send the request; return the connection once the answer's head is in."""
        if self._busy:
            raise RuntimeError("WireTransport carries one request at a time")
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        timeouts = request.extensions.get("timeout") or {}
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        head = self._head(request)
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        self._busy = True
        try:
            conn = self._conn
            if conn is None or conn.closed or self._key != key:
                if conn is not None:
                    conn.close()
                self._conn = None
                conn = self._conn = await self._connect(key, timeouts.get("connect"))
                self._key = key
            else:
                conn._reset()
            try:
                conn.transport.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.transport.write(body)
            except (OSError, RuntimeError) as exc:
                raise httpx.WriteError(f"could not send the request ({type(exc).__name__})") from None
            await conn.drain(timeouts.get("write"))
            read = timeouts.get("read")
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if conn.closed:
                    if conn.lost is not None:
                        raise httpx.ReadError(f"the connection broke ({type(conn.lost).__name__})")
                    raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
                await conn.wait(read)
            return conn
        except BaseException:
            self._finished(self._conn, reusable=False)
            raise

    def _finished(self, conn: _Connection | None, *, reusable: bool) -> None:
        """The answer is read (or abandoned): keep the connection only when it can carry the
        next request."""
        self._busy = False
        if conn is None:
            return
        if not (reusable and not conn.closed and conn.error is None and conn.keep_alive):
            conn.close()
            if self._conn is conn:
                self._conn = None

    @staticmethod
    def _head(request: httpx.Request) -> bytes:
        url = request.url
        lines = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        raw = request.headers.raw
        if not any(k.lower() == b"host" for k, _ in raw):
            lines += [b"Host: ", url.netloc, b"\r\n"]
        for k, v in raw:
            if _BAD_HEADER.search(k) or _BAD_HEADER.search(v):
                raise httpx.LocalProtocolError("a request header holds a line break or NUL")
            lines += [k, b": ", v, b"\r\n"]
        lines.append(b"\r\n")
        head = b"".join(lines)
        if b" " in url.raw_path or b"\r" in url.raw_path or b"\n" in url.raw_path:
            raise httpx.LocalProtocolError("the request target holds a space or a line break")
        return head

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            tls = self._ssl if self._ssl is not None else httpx.create_ssl_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"could not connect to {host}:{port} ({type(exc).__name__})") from None
        return conn

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
