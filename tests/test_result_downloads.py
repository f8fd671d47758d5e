"""Result downloads fetch only from Rupa's own origins (the trust boundary, point 2).

Rupa order events carry `results_pdf` / `results_hl7` links and `apply_events` downloads them. An
event is written by whoever can post to the receiver, so its links are fetched only from an
allowed origin (RUPA_BASE_URL's, plus RUPA_RESULT_ORIGINS), over https (plain http only to the
local sandbox on loopback), one checked redirect at a time (at most 5), over a connection to an
address checked when it opens (no loopback, private, link-local or metadata address but the
configured API's own), under RUPA_MAX_RESPONSE_BYTES on the wire and decoded. A refused link is
never fetched and stays pending with a reason naming at most its origin.

Everything runs against real servers on loopback: the sandbox (the configured Rupa API), a canary
(`EchoServer`, on another port) that must never see a request, and `FileServer` below (files,
redirects, a compressed bomb, and an https variant under a made-up host name).
"""

from __future__ import annotations

import datetime
import gzip
import os
import ssl
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from etl.checkout import events, intents
from etl.errors import ConfigError
from etl.settings import NetworkSettings, Settings
from etl.warehouse import rupa_ordered_tests, rupa_results
from tests.conftest import migrated
from tests.helpers import REPO
from tests.netpeers import EchoServer, ForwardProxy
from tests.rupa_support import ledger, with_rupa, write_intents

SQLITE = pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)  # about HTTP, not SQL
PDF = b"%PDF-1.4 a small result\n%%EOF\n"
HL7 = b"MSH|^~\\&|SANDBOX|LAB|||20260301||ORU^R01|1|P|2.3\r"


# ---- peers ------------------------------------------------------------------------------------------
class FileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 (https with `tls=(cert, key)`). GET routes:
    /pdf, /hl7                 a small result file
    /big/<n>                   n bytes, Content-Length declared
    /stream/<n>                n bytes, no Content-Length (the end of the connection ends it)
    /gz                        the PDF, gzip-encoded (Content-Encoding: gzip)
    /bomb/<n>                  n zero bytes, gzip-encoded
    /hop/<k>                   302 to /hop/<k-1>; /hop/0 is the PDF
    /redirect?to=<url>         302 to <url>
    `.seen`: request paths; `.sni`: the server names TLS clients asked for."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.seen: list[str] = []
        self.sni: list[str | None] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                peer.seen.append(self.path)
                parts = urlsplit(self.path)
                route, _, arg = parts.path.strip("/").partition("/")
                if route in ("pdf", "hl7"):
                    self.answer(200, PDF if route == "pdf" else HL7)
                elif route == "big":
                    self.answer(200, b"x" * int(arg))
                elif route == "stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/pdf")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    self.write(b"x" * int(arg))
                elif route == "gz":
                    self.answer(200, gzip.compress(PDF), {"Content-Encoding": "gzip"})
                elif route == "bomb":
                    self.answer(200, gzip.compress(b"\0" * int(arg), 9), {"Content-Encoding": "gzip"})
                elif route == "hop":
                    hops = int(arg)
                    self.answer(302, b"", {"Location": f"/hop/{hops - 1}" if hops else "/pdf"})
                elif route == "redirect":
                    self.answer(302, b"", {"Location": parse_qs(parts.query)["to"][0]})
                else:
                    self.answer(404, b"no such file")

            def answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/pdf")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.write(body)

            def write(self, body: bytes) -> None:
                try:
                    self.wfile.write(body)
                except OSError:  # the client stopped reading (over its cap): fine
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            ctx.sni_callback = lambda sock, name, _ctx: peer.sni.append(name)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def make_certificate(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `host` signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(cn: str, key, issuer: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labsync test CA")])
    ca = build("labsync test CA", ca_key, ca_name, ca_key, ca=True)
    cert = build(host, key, ca_name, ca_key, ca=False)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# ---- events with result links -----------------------------------------------------------------------
def post_results(server, order_id: str, links: dict[str, tuple[str | None, str | None]]) -> None:
    """An `order.new_result` event (as anyone who can reach the receiver could post one) whose
    ordered tests carry the given (results_pdf, results_hl7) links."""
    created = datetime.datetime.now(datetime.UTC).isoformat()
    included = [{"type": "ordered_test", "id": test_id,
                 "attributes": {"results_pdf": pdf, "results_hl7": hl7, "date_results_received_from_lab": created},
                 "relationships": {"order": {"data": {"type": "order", "id": order_id}},
                                   "lab_test": {"data": {"type": "lab_test", "id": "labts_0000001"}}}}
                for test_id, (pdf, hl7) in links.items()]
    body = {"type": "order.new_result", "created_at": created,
            "data": {"object": {"type": "order", "id": order_id, "attributes": {"status": "Results Received"}},
                     "included": included}}
    assert httpx.post(server.rupa_url, json=body).status_code == 200


def ordered_test(engine, test_id: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(rupa_ordered_tests).where(rupa_ordered_tests.c.id == test_id))
                    .mappings().one())


def stored(engine) -> list[tuple[str, str, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(rupa_results.c.ordered_test_id, rupa_results.c.kind, rupa_results.c.content)
                            .order_by(rupa_results.c.id)).all()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def assert_pending(engine, test_id: str, *words: str) -> str:
    """The ordered test's download is still pending; its reason has `words` and no path/query."""
    row = ordered_test(engine, test_id)
    error = row["results_error"] or ""
    assert row["results_pending"] == 1, row
    for word in words:
        assert word in error, error
    assert "sig=" not in error and "/steal" not in error and "/latest" not in error, error
    return error


# ---- refused links are never fetched ----------------------------------------------------------------
@SQLITE
def test_a_link_to_another_origin_is_never_fetched(engine, settings, receiver):
    server = receiver()
    with EchoServer() as canary:
        post_results(server, "ord_forged1", {"ordts_forged1": (
            f"{canary.url}/steal?sig=SECRET", "http://169.254.169.254/latest/meta-data/?sig=SECRET")})
        summary = events.apply_events(engine, settings)
        assert canary.seen == [] and canary.connections == 0
    assert summary.events == {"applied": 1} and summary.downloads_failed == 1 and summary.exit_code == 1
    error = assert_pending(engine, "ordts_forged1", f"http://127.0.0.1:{canary.port}", "http://169.254.169.254",
                           "not an allowed origin")
    assert "SECRET" not in error
    assert stored(engine) == []
    again = events.apply_events(engine, settings)  # still refused on the next run, still never fetched
    assert again.downloads_failed == 1 and canary.seen == []


@SQLITE
def test_the_vendors_links_download_and_a_forged_one_beside_them_does_not(engine, settings, rupa, receiver, tmp_path):
    server = receiver()
    path = write_intents(tmp_path / "one.csv", [{"row_id": "R1", "rupa_patient_id": "pat_0000004",
                                                 "lab_test_ids": "labts_0000003", "return_url": "https://app.example/back"}])
    intents.process_intents_file(engine, settings, path)
    oid = rupa.checkout.submit(ledger(engine)["R1"]["order_intent_id"])
    rupa.checkout.add_results(oid)
    assert rupa.checkout.sender.flush()
    with EchoServer() as canary:
        post_results(server, "ord_forged2", {"ordts_forged2": (f"{canary.url}/pdf", f"{canary.url}/hl7")})
        summary = events.apply_events(engine, settings)
        assert canary.seen == [] and canary.connections == 0
    assert summary.results_stored == 2 and summary.downloads_failed == 1
    kinds = sorted(kind for test_id, kind, _ in stored(engine) if test_id != "ordts_forged2")
    assert kinds == ["hl7", "pdf"] and all(t != "ordts_forged2" for t, _, _ in stored(engine))
    assert_pending(engine, "ordts_forged2", "not an allowed origin")


# ---- redirects --------------------------------------------------------------------------------------
@SQLITE
def test_a_redirect_off_the_vendors_origin_is_not_followed(engine, settings, receiver):
    server = receiver()
    with FileServer() as files, EchoServer() as canary:
        local = with_rupa(settings, base_url=f"{files.url()}/rupa")  # the files server is the vendor here
        post_results(server, "ord_redir", {"ordts_redir": (
            f"{files.url()}/redirect?to={quote(canary.url + '/steal?sig=SECRET')}",
            f"{files.url()}/redirect?to={quote('http://169.254.169.254/latest/meta-data/')}")})
        summary = events.apply_events(engine, local)
        assert canary.seen == [] and canary.connections == 0
        assert len(files.seen) == 2  # the first hop of each, on the vendor's origin
    assert summary.downloads_failed == 1 and stored(engine) == []
    error = assert_pending(engine, "ordts_redir", "redirects", f"http://127.0.0.1:{canary.port}",
                           "http://169.254.169.254")
    assert "SECRET" not in error


@SQLITE
def test_the_vendors_own_redirects_are_followed_up_to_five(engine, settings, receiver):
    server = receiver()
    with FileServer() as files, EchoServer() as canary:
        local = with_rupa(settings, base_url=f"{files.url()}/rupa")
        post_results(server, "ord_hops", {"ordts_five": (f"{files.url()}/hop/4", None),  # 5 redirects
                                          "ordts_six": (f"{files.url()}/hop/5", None)})  # 6: one too many
        summary = events.apply_events(engine, local)
        assert canary.seen == []
    assert summary.results_stored == 1 and summary.downloads_failed == 1
    assert stored(engine) == [("ordts_five", "pdf", PDF)]
    assert_pending(engine, "ordts_six", "more than 5")
    assert files.seen.count("/pdf") == 1  # the sixth redirect was not followed


# ---- a proxy -----------------------------------------------------------------------------------------
@SQLITE
def test_through_rupas_proxy_only_the_allowed_origins_are_asked_for(engine, settings, receiver):
    """With RUPA_PROXY the proxy connects (and resolves): it still gets nothing but the vendor's
    own origin to reach, redirects included."""
    server = receiver()
    with FileServer() as files, EchoServer() as canary, ForwardProxy() as proxy:
        local = with_rupa(settings, base_url=f"{files.url()}/rupa", network=NetworkSettings(proxy=proxy.url))
        post_results(server, "ord_proxy", {
            "ordts_ok": (f"{files.url()}/pdf", f"{files.url()}/hl7"),
            "ordts_forged": (f"{canary.url}/steal", f"{files.url()}/redirect?to={quote(canary.url + '/steal')}")})
        summary = events.apply_events(engine, local)
        assert canary.seen == [] and canary.connections == 0
        assert proxy.hosts() == {f"127.0.0.1:{files.port}"}
    assert summary.results_stored == 2 and summary.downloads_failed == 1
    assert stored(engine) == [("ordts_ok", "pdf", PDF), ("ordts_ok", "hl7", HL7)]
    assert_pending(engine, "ordts_forged", "not an allowed origin", "redirects")


# ---- the cap ----------------------------------------------------------------------------------------
@SQLITE
def test_an_answer_over_the_cap_is_refused_and_not_stored(engine, settings, receiver):
    server = receiver()
    cap = 64 << 10
    with FileServer() as files:
        local = with_rupa(settings, base_url=f"{files.url()}/rupa", max_response_bytes=cap)
        post_results(server, "ord_cap", {
            "ordts_declared": (f"{files.url()}/big/{cap + 1}", f"{files.url()}/hl7"),  # Content-Length says so
            "ordts_streamed": (f"{files.url()}/stream/{4 * cap}", None),  # no length: counted on the wire
            "ordts_bomb": (f"{files.url()}/bomb/{64 * cap}", None),  # 4 MiB of zeros in ~4 KiB of gzip
            "ordts_fits": (f"{files.url()}/big/{cap}", f"{files.url()}/gz"),  # the decoded file is kept
        })
        summary = events.apply_events(engine, local)
    assert summary.downloads_failed == 3 and summary.results_stored == 3
    assert sorted((t, k, len(c)) for t, k, c in stored(engine)) == [
        ("ordts_declared", "hl7", len(HL7)), ("ordts_fits", "hl7", len(PDF)), ("ordts_fits", "pdf", cap)]
    assert ("ordts_fits", "hl7", PDF) in stored(engine)
    for test_id in ("ordts_declared", "ordts_streamed", "ordts_bomb"):
        assert_pending(engine, test_id, "larger than 64 KiB", "RUPA_MAX_RESPONSE_BYTES")


# ---- the address check ------------------------------------------------------------------------------
@SQLITE
def test_a_name_resolving_to_loopback_is_refused_unless_it_is_the_configured_origin(engine, settings, receiver):
    """`localhost` is 127.0.0.1 all right, but only the configured origin (the sandbox, at
    http://127.0.0.1:PORT) may be on loopback."""
    server = receiver()
    with EchoServer() as canary:
        local = with_rupa(settings, result_origins=(f"http://localhost:{canary.port}",))
        post_results(server, "ord_local", {"ordts_local": (f"http://localhost:{canary.port}/steal?sig=SECRET", None)})
        summary = events.apply_events(engine, local)
        assert canary.seen == [] and canary.connections == 0
    assert summary.downloads_failed == 1 and stored(engine) == []
    assert_pending(engine, "ordts_local", "localhost resolves to", "loopback")


@SQLITE
@pytest.mark.parametrize("answer", [["169.254.169.254"], ["10.0.0.7"], ["203.0.113.9", "127.0.0.1"],
                                    ["fd00:ec2::254"], ["::ffff:127.0.0.1"]],
                         ids=["metadata", "private", "one-of-several", "ipv6-metadata", "mapped"])
def test_a_name_resolving_to_an_internal_address_is_refused(engine, settings, receiver, monkeypatch, answer):
    import etl.http

    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return answer

    monkeypatch.setattr(etl.http, "resolve", resolve)
    server = receiver()
    local = with_rupa(settings, result_origins=("https://files.rupa.test",))
    post_results(server, "ord_dns", {"ordts_dns": ("https://files.rupa.test/r/1?sig=SECRET", None)})
    summary = events.apply_events(engine, local)
    assert asked == [("files.rupa.test", 443)]  # checked once, refused, nothing else tried
    assert summary.downloads_failed == 1 and stored(engine) == []
    assert_pending(engine, "ordts_dns", "files.rupa.test resolves to", "loopback, private, link-local or metadata")


@SQLITE
def test_the_connection_goes_to_the_address_that_was_checked(engine, settings, receiver, monkeypatch, tmp_path):
    """No second look-up between the check and the connection (DNS rebinding): `files.rupa.test`
    does not exist outside this test, its one answer is checked and connected to, and TLS still
    names the host (SNI, the certificate checked against it)."""
    import etl.http

    ca, cert, key = make_certificate(tmp_path, "files.rupa.test")
    answers = iter([["127.0.0.1"]])  # a second look-up would raise StopIteration
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    checked = etl.http.is_internal_address
    monkeypatch.setattr(etl.http, "resolve", resolve)
    # stand-in for a public address: this loopback one passes the check in this test only
    monkeypatch.setattr(etl.http, "is_internal_address", lambda a: a != "127.0.0.1" and checked(a))
    server = receiver()
    with FileServer(tls=(cert, key)) as files:
        origin = files.url("files.rupa.test")
        local = with_rupa(settings, result_origins=(origin,), network=NetworkSettings(ca_bundle=str(ca)))
        post_results(server, "ord_tls", {"ordts_tls": (f"{origin}/pdf?sig=1", f"{origin}/hl7?sig=2")})
        summary = events.apply_events(engine, local)
        assert files.seen == ["/pdf?sig=1", "/hl7?sig=2"] and files.sni == ["files.rupa.test"]
    assert summary.results_stored == 2 and summary.downloads_failed == 0
    assert asked == ["files.rupa.test"]  # one connection, one look-up
    assert stored(engine) == [("ordts_tls", "pdf", PDF), ("ordts_tls", "hl7", HL7)]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                     "169.254.169.254", "100.100.100.200", "0.0.0.0", "::1", "fe80::1",
                                     "fd00:ec2::254", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:a00:1::",
                                     "224.0.0.1", "not an address"])
def test_internal_addresses(address):
    from etl.http import is_internal_address

    assert is_internal_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses(address):
    from etl.http import is_internal_address

    assert not is_internal_address(address)


# ---- the setting ------------------------------------------------------------------------------------
def test_result_origins_are_read_and_checked():
    read = Settings.from_env({"RUPA_RESULT_ORIGINS": " https://files.rupahealth.com/ , https://cdn.example:8443"})
    assert read.rupa.result_origins == ("https://files.rupahealth.com", "https://cdn.example:8443")
    assert Settings.from_env({"RUPA_RESULT_ORIGINS": "http://127.0.0.1:9000"}).rupa.result_origins == (
        "http://127.0.0.1:9000",)  # plain http: loopback only
    assert Settings.from_env({}).rupa.result_origins == ()
    for bad in ("http://files.rupahealth.com", "https://files.rupahealth.com/results", "https://files.example?x=1",
                "https://user@files.example", "files.rupahealth.com", "ftp://files.example", "https://",
                "https://files.example:99999", "https://files.example#x"):
        with pytest.raises(ConfigError, match="RUPA_RESULT_ORIGINS"):
            Settings.from_env({"RUPA_RESULT_ORIGINS": bad})


def test_a_plain_http_result_origin_stops_apply_events_with_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUPA_", "LGC_", "LABSYNC_"))}
    env.update({"PYTHONPATH": str(REPO), "LABSYNC_WAREHOUSE_URL": migrated(f"sqlite:///{tmp_path / 'w.db'}"),
                "RUPA_RESULT_ORIGINS": "https://files.rupahealth.com,http://files.example.com"})
    done = subprocess.run([sys.executable, "-m", "etl.cli", "rupa", "apply-events"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "RUPA_RESULT_ORIGINS" in done.stderr and "http://files.example.com" in done.stderr


def test_a_settings_object_with_a_bad_origin_cannot_be_made():
    with pytest.raises(ConfigError, match="RUPA_RESULT_ORIGINS"):
        replace(Settings().rupa, result_origins=("http://10.0.0.1",))
