"""etl.wire, the loader's thin HTTP/1.1 transport, against a real TCP server that answers
exactly the bytes each case scripts: keep-alive reuse, every way a body can be framed, the
errors httpx's own transport raises, timeouts, the size cap, and the same complete answer as
httpx's transport + etl.http.aread_capped for each case."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import json
import ssl

import httpx
import pytest

from etl.http import OVER_CAP, aread_capped, over_cap
from etl.wire import WireTransport

TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
LIMIT = 64 << 10


def _answer(status: int, body: bytes = b"", *, headers: list[tuple[str, str]] | None = None,
            length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(status: int, parts: list[bytes]) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


ORDER = json.dumps({"clientOrderId": "ORD-1", "orderItems": [{"code": "GLCS", "id": "1"}]}).encode()

# path -> what the server writes back (then it closes when `close` is set)
SCRIPTS: dict[str, tuple[bytes, bool]] = {
    "/ok": (_answer(202, ORDER, headers=[("Content-Type", "application/json")]), False),
    "/chunked": (_chunked(200, [b'{"a":', b' 1}']), False),
    "/until-close": (b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\n\r\n" + ORDER, True),
    "/empty-204": (b"HTTP/1.1 204 No Content\r\n\r\n", False),
    "/503": (_answer(503, b'{"title": "busy"}', headers=[("Retry-After", "2")]), False),
    "/declared-huge": (_answer(200, b"x" * 10, headers=[("Content-Length", str(LIMIT * 4))], length=False), False),
    "/huge-chunked": (_chunked(200, [b"y" * (16 << 10)] * 8), False),
    "/gzip": (_answer(200, gzip.compress(b"z" * (LIMIT * 2)), headers=[("Content-Encoding", "gzip")]), False),
    "/gzip-small": (_answer(200, gzip.compress(ORDER), headers=[("Content-Encoding", "gzip")]), False),
}
# stricter than h11 (which takes two equal lengths as one): RFC 9112 lets a client refuse them
TWO_LENGTHS = b"HTTP/1.1 200 X\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """A TCP server answering each request with the bytes scripted for its path; special
    paths misbehave. Counts connections, so reuse is visible."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tls = tls

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                path = head.split(b" ")[1].decode()
                if path == "/hang":
                    await asyncio.sleep(30)
                    return
                if path == "/close-silently":
                    return
                if path == "/garbage":
                    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                    await writer.drain()
                    return
                if path == "/two-lengths":
                    writer.write(TWO_LENGTHS)
                    await writer.drain()
                    return
                if path == "/cut-body":
                    writer.write(_answer(200, b"")[:-4] + b"\r\nContent-Length: 100\r\n\r\n" + b"partial")
                    await writer.drain()
                    return
                if path == "/endless":
                    writer.write(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\n\r\n")
                    for _ in range(4096):  # 64 MiB if nobody hangs up
                        writer.write(b" " * (16 << 10))
                        await writer.drain()
                    return
                data, close = SCRIPTS[path]
                writer.write(data)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _request(url: str, **headers: str) -> httpx.Request:
    return httpx.Request("PUT", url, content=b'{"x": 1}', headers={"Content-Type": "application/json", **headers},
                         extensions={"timeout": TIMEOUT})


def _run(coro_fn):
    async def go():
        async with Server() as server:
            return await coro_fn(server)
    return asyncio.run(go())


def test_one_connection_carries_many_requests_and_the_bytes_arrive_whole():
    async def go(server):
        async with WireTransport() as wire:
            for _ in range(5):
                response = await wire.send_capped(_request(server.url("/ok")), LIMIT)
                assert response.status_code == 202 and response.json()["clientOrderId"] == "ORD-1"
        return server

    server = _run(go)
    assert server.connections == 1 and len(server.requests) == 5
    head, body = server.requests[0].split(b"\r\n\r\n")
    assert body == b'{"x": 1}'
    assert head.startswith(b"PUT /ok HTTP/1.1\r\n") and b"\r\nContent-Length: 8" in head
    assert b"\r\nHost: 127.0.0.1:" in head and b"\r\nContent-Type: application/json" in head


@pytest.mark.parametrize("path", sorted(SCRIPTS))
def test_the_same_complete_answer_as_httpx_and_aread_capped(path):
    """Each scripted answer, read by the thin transport in one step and by httpx's own transport
    + aread_capped: same status, headers, body and cap verdict."""
    async def go(server):
        async with WireTransport() as wire, httpx.AsyncHTTPTransport() as stock:
            thin = await wire.send_capped(_request(server.url(path)), LIMIT)
            request = _request(server.url(path))
            thin_streamed = await aread_capped(await wire.handle_async_request(request), request, LIMIT)
            request = _request(server.url(path))
            reference = await aread_capped(await stock.handle_async_request(request), request, LIMIT)
        return thin, thin_streamed, reference

    thin, thin_streamed, reference = _run(go)
    for mine in (thin, thin_streamed):
        assert mine.status_code == reference.status_code
        assert mine.content == reference.content
        assert over_cap(mine) == over_cap(reference)
        assert [(k.lower(), v) for k, v in mine.headers.multi_items() if k.lower() != "content-length"] == \
            [(k.lower(), v) for k, v in reference.headers.multi_items() if k.lower() != "content-length"]


def test_cap_verdicts():
    async def go(server):
        async with WireTransport() as wire:
            return {p: await wire.send_capped(_request(server.url(p)), LIMIT)
                    for p in ("/declared-huge", "/huge-chunked", "/gzip", "/gzip-small", "/503", "/endless")}

    got = _run(go)
    assert got["/declared-huge"].extensions[OVER_CAP] and got["/declared-huge"].content == b""
    assert over_cap(got["/huge-chunked"]) and got["/huge-chunked"].content == b""
    assert over_cap(got["/gzip"])  # counted at its decoded size: 128 KiB > 64 KiB
    assert not over_cap(got["/gzip-small"]) and got["/gzip-small"].content == ORDER
    assert got["/503"].status_code == 503 and got["/503"].content == b"" and not over_cap(got["/503"])
    assert got["/503"].headers["Retry-After"] == "2"
    assert over_cap(got["/endless"]) and got["/endless"].content == b""


def test_an_endless_answer_is_cut_near_the_cap_and_the_next_request_gets_a_new_connection():
    async def go(server):
        async with WireTransport() as wire:
            cut = await wire.send_capped(_request(server.url("/endless")), LIMIT)
            after = await wire.send_capped(_request(server.url("/ok")), LIMIT)
        return server, cut, after

    server, cut, after = _run(go)
    assert over_cap(cut) and after.status_code == 202 and server.connections == 2


@pytest.mark.parametrize("path,error", [
    ("/close-silently", httpx.RemoteProtocolError),
    ("/garbage", httpx.RemoteProtocolError),
    ("/cut-body", httpx.RemoteProtocolError),
    ("/two-lengths", httpx.RemoteProtocolError),
])
def test_broken_answers_raise_httpx_errors_and_the_next_request_reconnects(path, error):
    async def go(server):
        async with WireTransport() as wire:
            with pytest.raises(error):
                await wire.send_capped(_request(server.url(path)), LIMIT)
            return server, await wire.send_capped(_request(server.url("/ok")), LIMIT)

    server, after = _run(go)
    assert after.status_code == 202 and server.connections == 2


def test_a_server_that_never_answers_is_a_read_timeout():
    async def go(server):
        request = _request(server.url("/hang"))
        request.extensions["timeout"] = {**TIMEOUT, "read": 0.2}
        async with WireTransport() as wire:
            with pytest.raises(httpx.ReadTimeout):
                await wire.send_capped(request, LIMIT)
            return await wire.send_capped(_request(server.url("/ok")), LIMIT)

    assert _run(go).status_code == 202


def test_refused_connections_and_unknown_schemes_are_httpx_errors():
    async def go():
        async with Server() as server:
            port = server.port
        async with WireTransport() as wire:
            with pytest.raises(httpx.ConnectError):
                await wire.send_capped(_request(f"http://127.0.0.1:{port}/ok"), LIMIT)
            with pytest.raises(httpx.UnsupportedProtocol):
                await wire.send_capped(_request("ftp://127.0.0.1/ok"), LIMIT)

    asyncio.run(go())


def test_a_header_with_a_line_break_is_never_sent():
    async def go(server):
        async with WireTransport() as wire:
            with pytest.raises(httpx.LocalProtocolError):
                await wire.send_capped(_request(server.url("/ok"), Authorization="Bearer a\r\nX-Evil: 1"), LIMIT)
        return server

    assert _run(go).requests == []


def test_a_cancelled_request_drops_its_connection():
    async def go(server):
        async with WireTransport() as wire:
            task = asyncio.create_task(wire.send_capped(_request(server.url("/hang")), LIMIT))
            while not server.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return server, await wire.send_capped(_request(server.url("/ok")), LIMIT)

    server, after = _run(go)
    assert after.status_code == 202 and server.connections == 2


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files (cryptography, no openssl CLI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_with_the_callers_trust_store_and_nothing_without_it(tmp_path):
    """LetsGetChecked is HTTPS: the connection is verified against the SSL context the loader
    hands in (httpx.create_ssl_context, the CA bundle); an untrusted certificate never carries a PUT."""
    cert, key = _self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def go():
        async with Server(tls=served) as server:
            async with WireTransport(verify=ssl.create_default_context(cafile=cert)) as wire:
                answers = [await wire.send_capped(_request(server.url("/ok")), LIMIT) for _ in range(3)]
            async with WireTransport(verify=httpx.create_ssl_context()) as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.send_capped(_request(server.url("/ok")), LIMIT)
            return server, answers

    server, answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert len(server.requests) == 3 and server.connections == 1  # kept alive; the refused one never got in


# ---- the loader on it ---------------------------------------------------------------------------
def _spy(monkeypatch) -> list[str]:
    """Counts the PUTs that go through WireTransport.send_capped (which still does the work)."""
    from etl import wire

    seen: list[str] = []
    real = wire.WireTransport.send_capped

    async def counted(self, request, limit):
        seen.append(request.url.path)
        return await real(self, request, limit)

    monkeypatch.setattr(wire.WireTransport, "send_capped", counted)
    return seen


def test_the_loader_sends_every_put_through_the_thin_transport(lite_engine, lite_settings, sandbox, monkeypatch):
    from etl.orders.load import load_rows
    from tests.test_lgc_support import fast, order_row

    seen = _spy(monkeypatch)
    summary = load_rows(lite_engine, fast(lite_settings, concurrency=4), [order_row(i) for i in range(1, 21)])
    assert summary.counts == {"accepted": 20} and summary.requests == 20
    assert sorted(p.rsplit("/", 1)[1] for p in seen) == [f"ORD-{i:05d}" for i in range(1, 21)]
    assert sandbox.sandbox.lgc.accepted_count.total() == 20


def test_without_httptools_the_loader_uses_httpx_and_does_the_same(lite_engine, lite_settings, sandbox, monkeypatch):
    from etl import wire
    from etl.orders.load import load_rows
    from tests.test_lgc_support import fast, order_row

    seen = _spy(monkeypatch)
    monkeypatch.setattr(wire, "available", lambda: False)
    summary = load_rows(lite_engine, fast(lite_settings, concurrency=4), [order_row(i) for i in range(1, 11)])
    assert summary.counts == {"accepted": 10} and seen == []
    assert sandbox.sandbox.lgc.accepted_count.total() == 10
