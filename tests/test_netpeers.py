"""tests/netpeers.py: each loopback peer really does what it says, with httpx as the client.

What httpx (0.29, installed) does with NO_PROXY, checked below: `NO_PROXY=127.0.0.1` makes it go
straight to 127.0.0.1 on any port and scheme (an `all://127.0.0.1` mount without proxy), so the
proxy sees nothing; `NO_PROXY=localhost` does not cover 127.0.0.1 (nor `127.0.0.1` localhost),
and a CIDR entry such as `127.0.0.0/8` covers nothing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import threading
import warnings

import httpx
import pytest

from tests.netpeers import (
    CLIENT_CN,
    EchoServer,
    ForwardProxy,
    InterimRelay,
    TlsRelay,
    make_tls,
    wait_until,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
# How httpx reports a TLS handshake the server refused (TLS 1.3: on the first read).
REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    """No proxy from the environment unless a test sets one (either case counts)."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "request_method"):
            monkeypatch.delenv(name)


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


def netpeer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("netpeers-")]


# ForwardProxy


def test_proxy_relays_get_and_put_with_body(echo):
    with ForwardProxy() as proxy, httpx.Client(proxy=proxy.url) as client:
        got = client.get(f"{echo.url}/lgc/DEMO/api/v2/orders/X?page=2")
        put = client.put(f"{echo.url}/lgc/DEMO/api/v2/orders/X", json={"id": "X"})
    assert got.status_code == 200
    assert got.json()["method"] == "GET"
    assert got.json()["path"] == "/lgc/DEMO/api/v2/orders/X?page=2"
    assert got.json()["headers"]["host"] == f"127.0.0.1:{echo.port}"
    assert put.json()["method"] == "PUT"
    assert json.loads(put.json()["body"]) == {"id": "X"}
    assert proxy.seen == [
        ("GET", f"{echo.url}/lgc/DEMO/api/v2/orders/X?page=2"),
        ("PUT", f"{echo.url}/lgc/DEMO/api/v2/orders/X"),
    ]
    assert proxy.hosts() == {f"127.0.0.1:{echo.port}"}
    assert proxy.errors == []


def test_proxy_relays_chunked_request_bodies(echo):
    def parts():
        yield b"first,"
        yield b"second"

    with ForwardProxy() as proxy, httpx.Client(proxy=proxy.url) as client:
        answer = client.post(f"{echo.url}/upload", content=parts())
    assert answer.json()["body"] == "first,second"
    assert answer.json()["headers"]["transfer-encoding"] == "chunked"
    assert proxy.seen == [("POST", f"{echo.url}/upload")]


def test_proxy_relays_every_response_framing(echo):
    with ForwardProxy() as proxy, httpx.Client(proxy=proxy.url) as client:
        chunked = client.get(f"{echo.url}/a?_frame=chunked")
        closed = client.get(f"{echo.url}/b?_frame=close")
        after_close = client.get(f"{echo.url}/c")
        head = client.head(f"{echo.url}/d")
        empty = client.delete(f"{echo.url}/e?_status=204")
        last = client.get(f"{echo.url}/f")
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert chunked.json()["path"] == "/a?_frame=chunked"
    assert "content-length" not in closed.headers and closed.headers["connection"] == "close"
    assert closed.json()["path"] == "/b?_frame=close"
    assert after_close.json()["path"] == "/c"
    assert head.status_code == 200 and head.content == b""
    assert empty.status_code == 204 and empty.content == b""
    assert last.json()["path"] == "/f"
    # only the close-delimited answer ended a client connection
    assert proxy.connections == 2
    assert proxy.errors == []


def test_proxy_keeps_one_connection_alive_for_many_requests(echo):
    with ForwardProxy() as proxy, httpx.Client(proxy=proxy.url) as client:
        for n in range(30):
            answer = client.post(f"{echo.url}/n/{n}", content=f"body {n}")
            assert answer.json()["path"] == f"/n/{n}"
            assert answer.json()["body"] == f"body {n}"
    assert len(proxy.seen) == 30
    assert proxy.connections == 1  # client to proxy
    assert echo.connections == 1  # proxy to origin


def test_proxy_from_the_environment(echo, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with httpx.Client() as client:  # trust_env=True by default
            answer = client.get(f"{echo.url}/via-env")
    assert answer.json()["path"] == "/via-env"
    assert proxy.seen == [("GET", f"{echo.url}/via-env")]


def test_no_proxy_with_the_ip_goes_straight(echo, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with httpx.Client() as client:
            answer = client.get(f"{echo.url}/straight")
    assert answer.json()["path"] == "/straight"
    assert proxy.seen == []  # httpx honours an IPv4 NO_PROXY entry, on any port
    assert echo.seen == [("GET", "/straight")]


def test_no_proxy_localhost_does_not_cover_the_ip(echo, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
        with httpx.Client() as client:
            client.get(f"{echo.url}/proxied")
    assert proxy.seen == [("GET", f"{echo.url}/proxied")]


def test_proxy_with_the_async_client(echo):
    async def run(proxy_url: str) -> list[dict]:
        async with httpx.AsyncClient(proxy=proxy_url) as client:
            answers = [await client.put(f"{echo.url}/a/{n}", content=str(n)) for n in range(10)]
            answers += await asyncio.gather(*(client.get(f"{echo.url}/b/{n}") for n in range(5)))
        return [a.json() for a in answers]

    with ForwardProxy() as proxy:
        answers = asyncio.run(run(proxy.url))
    assert [a["path"] for a in answers[:10]] == [f"/a/{n}" for n in range(10)]
    assert [a["body"] for a in answers[:10]] == [str(n) for n in range(10)]
    assert sorted(a["path"] for a in answers[10:]) == [f"/b/{n}" for n in range(5)]
    assert len(proxy.seen) == 15


def test_proxy_tunnels_connect_to_a_tls_relay(echo, tls):
    with TlsRelay(echo.url, tls) as relay, ForwardProxy() as proxy:
        with httpx.Client(proxy=proxy.url, verify=tls.client_context()) as client:
            first = client.get(f"{relay.url}/secure?x=1")
            second = client.post(f"{relay.url}/secure", content=b"payload")
    assert first.json()["path"] == "/secure?x=1"
    assert second.json()["body"] == "payload"
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{relay.port}")]  # one tunnel, kept alive
    assert proxy.hosts() == {f"127.0.0.1:{relay.port}"}
    assert relay.client_subjects == [CLIENT_CN]
    assert relay.count == 2


def test_https_proxy_from_the_environment(echo, tls, monkeypatch):
    with TlsRelay(echo.url, tls) as relay, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with httpx.Client(verify=tls.client_context()) as client:
            answer = client.get(f"{relay.url}/env")
    assert answer.json()["path"] == "/env"
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{relay.port}")]


def test_proxy_refuses_other_hosts_and_itself():
    with ForwardProxy() as proxy, httpx.Client(proxy=proxy.url) as client:
        elsewhere = client.get("http://example.invalid/x")
        itself = client.get(f"{proxy.url}/x")
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        nobody = client.get(f"http://127.0.0.1:{port}/x")
    assert elsewhere.status_code == 403
    assert itself.status_code == 508
    assert nobody.status_code == 502
    assert proxy.errors == []


# InterimRelay


@pytest.mark.parametrize("interim", [[CONTINUE], [EARLY_HINTS], [CONTINUE, EARLY_HINTS]])
def test_interim_relay_answers_each_request_with_its_own_answer(echo, interim):
    with InterimRelay(echo.url, interim) as relay, httpx.Client(base_url=relay.url) as client:
        for n in range(50):
            method = "PUT" if n % 2 else "GET"
            answer = client.request(method, f"/r/{n}", content=f"n={n}" if n % 2 else None)
            assert answer.status_code == 200
            assert answer.json()["method"] == method
            assert answer.json()["path"] == f"/r/{n}"
            assert answer.json()["body"] == (f"n={n}" if n % 2 else "")
    assert relay.count == 50
    assert relay.connections == 1
    assert echo.connections == 1
    assert relay.errors == []


@pytest.mark.parametrize("interim", [[CONTINUE], [EARLY_HINTS]])
def test_interim_relay_with_the_async_client(echo, interim):
    async def run(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url) as client:
            return [(await client.post(f"/a/{n}", content=str(n))).json() for n in range(50)]

    with InterimRelay(echo.url, interim) as relay:
        answers = asyncio.run(run(relay.url))
    assert [(a["path"], a["body"]) for a in answers] == [(f"/a/{n}", str(n)) for n in range(50)]
    assert relay.count == 50
    assert relay.connections == 1


def test_interim_relay_sends_the_interim_answers_first(echo):
    """On the wire: each request gets the 1xx answers, then its own final answer."""
    with InterimRelay(echo.url, [CONTINUE, EARLY_HINTS]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
            for n in range(3):
                sock.sendall(f"GET /raw/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                first = sock.recv(65536)  # the interims arrive ~5 ms before the answer
                received = first
                while b'"path"' not in received or not received.endswith(b"}"):
                    received += sock.recv(65536)
                assert first.startswith(CONTINUE)
                assert b"HTTP/1.1 200" not in first
                assert received.startswith(CONTINUE + EARLY_HINTS + b"HTTP/1.1 200 OK\r\n")
                assert f'"path": "/raw/{n}"'.encode() in received
    assert relay.count == 3


def test_interim_relay_in_front_of_the_sandbox(sandbox):
    with InterimRelay(sandbox.url, [CONTINUE]) as relay, httpx.Client() as client:
        direct = client.get(f"{sandbox.url}/rupa/lab_tests")
        relayed = client.get(f"{relay.url}/rupa/lab_tests")
    assert relayed.status_code == direct.status_code
    assert relayed.content == direct.content
    assert relay.seen == [("GET", "/rupa/lab_tests")]


def test_relay_with_an_upstream_path_prefix(echo):
    with InterimRelay(f"{echo.url}/base", []) as relay, httpx.Client() as client:
        answer = client.get(f"{relay.url}/x?y=1")
    assert answer.json()["path"] == "/base/x?y=1"


# TlsRelay


def test_tls_relay_accepts_the_client_certificate(echo, tls):
    with TlsRelay(echo.url, tls) as relay:
        assert relay.url == f"https://127.0.0.1:{relay.port}"
        with httpx.Client(verify=tls.client_context()) as client:
            answers = [client.put(f"{relay.url}/o/{n}", content=str(n)) for n in range(5)]
        with httpx.Client(verify=tls.client_context()) as client:
            client.get(f"{relay.url.replace('127.0.0.1', 'localhost')}/by-name")
    assert [a.json()["body"] for a in answers] == [str(n) for n in range(5)]
    assert relay.client_subjects == [CLIENT_CN, CLIENT_CN]  # one per connection
    assert relay.refused == 0
    assert relay.count == 6


@pytest.mark.parametrize("cert", [None, "other"])
def test_tls_relay_refuses_no_or_a_foreign_certificate(echo, tls, cert):
    with TlsRelay(echo.url, tls) as relay:
        with httpx.Client(verify=tls.client_context(cert)) as client:
            with pytest.raises(REFUSED):
                client.get(f"{relay.url}/nope")
        assert wait_until(lambda: relay.refused == 1), relay.handshake_errors
        with httpx.Client(verify=tls.client_context()) as client:
            assert client.get(f"{relay.url}/yes").status_code == 200
    assert relay.client_subjects == [CLIENT_CN]
    assert echo.seen == [("GET", "/yes")]


def test_tls_relay_without_client_certificates(echo, tls):
    with TlsRelay(echo.url, tls, require_client_cert=False) as relay:
        with httpx.Client(verify=tls.client_context(None)) as client:
            assert client.get(f"{relay.url}/open").json()["path"] == "/open"
        with httpx.Client(verify=False) as client:  # a client that distrusts nothing
            assert client.get(f"{relay.url}/open").status_code == 200
    assert relay.refused == 0
    assert relay.client_subjects == []


def test_tls_relay_counts_a_client_that_distrusts_it(echo, tls):
    with TlsRelay(echo.url, tls) as relay:
        with httpx.Client() as client:  # the system's CAs, not ours
            with pytest.raises(httpx.ConnectError):
                client.get(f"{relay.url}/x")
        with httpx.Client() as client:  # plain HTTP to a TLS port
            with pytest.raises(httpx.TransportError):
                client.get(f"http://127.0.0.1:{relay.port}/x")
        assert wait_until(lambda: relay.refused == 2), relay.handshake_errors


# Life cycle


def test_peers_leave_no_threads_or_sockets(echo, tls):
    before = netpeer_threads()
    with warnings.catch_warnings():  # what earlier tests of this worker left for the collector
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        peers = [
            ForwardProxy(),
            InterimRelay(echo.url, [CONTINUE]),
            TlsRelay(echo.url, tls),
            EchoServer(),
        ]
        for peer in peers:
            with peer:
                # leave a kept-alive client connection open while the peer stops
                client = httpx.Client(verify=tls.client_context())
                target = peer.url if not isinstance(peer, ForwardProxy) else None
                if target:
                    client.get(f"{target}/x")
                else:
                    httpx.Client(proxy=peer.url).close()
                    with socket.create_connection(("127.0.0.1", peer.port)):
                        pass
            port = peer.port
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            client.close()
        del peers, peer
        gc.collect()
    assert netpeer_threads() == before
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert [str(w.message) for w in leaks] == []


def test_a_peer_starts_once_and_stops_twice(echo):
    proxy = ForwardProxy().start()
    with pytest.raises(RuntimeError):
        proxy.start()
    proxy.stop()
    proxy.stop()
    with pytest.raises(ValueError):
        InterimRelay("https://127.0.0.1:1", [])
    with pytest.raises(ValueError):
        InterimRelay(echo.url, [b"HTTP/1.1 200 OK\r\n\r\n"])
