"""The HTTP stack end to end, on real loopback peers (tests/netpeers.py) in front of the sandbox:
every vendor client built by etl.http honours the proxy environment (HTTP_PROXY, NO_PROXY), a
per-vendor proxy (LGC_PROXY), a CA bundle and a client certificate (environment variables and
Airflow Connection extras), and httpx's own handling of interim 1xx answers; and every numeric
setting of the HTTP stack refuses nan, inf and senseless values with exit 2 naming it.

The commands run in this process (`etl.cli.main`) with the environment set by monkeypatch;
each peer is a context manager and is stopped when its block ends."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from etl import cli
from etl.errors import LabsyncError
from etl.orders.load import load_rows
from etl.warehouse import lgc_outbox, rupa_patients
from etl.warehouse.tables import lgc_order_items
from tests.conftest import FAST_RETRY, TEST_FERNET_KEY, migrated
from tests.netpeers import CLIENT_CN, ForwardProxy, InterimRelay, TlsRelay, make_tls, wait_until
from tests.rupa_support import authorize, count
from tests.test_lgc_support import csv_row, ledger, order_row, write_csv

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "request_method")
FAILURE_STATES = {"failed", "pending", "unconfirmed", "queued", "given_up"}


# ---- fixtures and helpers ----------------------------------------------------------------------


def _clean_environment(monkeypatch) -> None:
    """No proxy variable (either case) and no labsync setting from the caller's environment."""
    for name in list(os.environ):
        if name.lower() in PROXY_VARIABLES or name.startswith(("LGC_", "RUPA_", "LABSYNC_", "AIRFLOW_CONN_")):
            monkeypatch.delenv(name)


def _base_environment(monkeypatch, settings, *, concurrency: int = 4) -> None:
    _clean_environment(monkeypatch)
    for name, value in {
        "LGC_BASE_URL": settings.lgc.base_url,
        "RUPA_BASE_URL": settings.rupa.base_url,
        "RUPA_PAGE_SIZE": "7",
        "LABSYNC_WAREHOUSE_URL": settings.warehouse_url,
        "LABSYNC_FERNET_KEY": TEST_FERNET_KEY,
        "LABSYNC_INBOX": str(settings.inbox),
        "LGC_CONCURRENCY": str(concurrency),
        "LGC_RATE_LIMIT": "0",
        "LABSYNC_RETRY_ATTEMPTS": str(FAST_RETRY.max_attempts),
        "LABSYNC_RETRY_INITIAL_WAIT": str(FAST_RETRY.initial_wait),
        "LABSYNC_RETRY_MAX_WAIT": str(FAST_RETRY.max_wait),
        "LABSYNC_HTTP_TIMEOUT": str(FAST_RETRY.timeout),
    }.items():
        monkeypatch.setenv(name, value)


def _set_proxy_env(monkeypatch, name: str, value: str) -> None:
    """Both spellings alike (urllib reads either; the lower-case one wins on a conflict)."""
    monkeypatch.setenv(name.upper(), value)
    monkeypatch.setenv(name.lower(), value)


def _runner(capsys):
    """`labsync ARGS` in this process: (exit code, stdout, stderr)."""

    def _run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture
def run(lite_settings, monkeypatch, capsys):
    """`labsync ARGS` in this process, the environment pointing at the sandbox and the SQLite
    warehouse, no proxy variables unless a test sets them."""
    _base_environment(monkeypatch, lite_settings)
    return _runner(capsys)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


def _orders_csv(tmp_path: Path, n: int, name: str = "batch.csv") -> tuple[Path, list[str]]:
    # different kits per row, so a mixed-up answer shows in the item list too
    records = [csv_row(i, order_items="GLCS;FCIT:2" if i % 2 else "GLCS") for i in range(n)]
    return write_csv(tmp_path / name, records), [r["client_order_id"] for r in records]


class Traffic:
    """What reached the sandbox (its own record) and what a peer relayed, from a mark on."""

    def __init__(self, sandbox, peer=None) -> None:
        self.sandbox, self.peer = sandbox.sandbox, peer
        self.mark()

    def mark(self) -> None:
        self._received = len(self.sandbox.received)
        self._seen = len(self.peer.seen) if self.peer is not None else 0

    def received(self, prefix: str) -> Counter:
        """(method, raw path) of the sandbox's requests under `prefix` since the mark."""
        return Counter((m, p.decode("latin-1")) for m, p in list(self.sandbox.received)[self._received:]
                       if p.startswith(prefix.encode()))

    def seen(self) -> list[tuple[str, str]]:
        return list(self.peer.seen)[self._seen:]

    def proxied(self, prefix: str) -> Counter:
        """(method, path) of the requests the proxy relayed under `prefix` since the mark."""
        return Counter((m, urlsplit(t).path) for m, t in self.seen() if urlsplit(t).path.startswith(prefix))


def _item_ids(sandbox, coid: str) -> list[dict]:
    return sandbox.sandbox.lgc.orders[coid]["response"]["orderItems"]


def _assert_each_accepted_once(engine, sandbox, coids: list[str]) -> None:
    """Every row accepted in the ledger with the item ids the sandbox created for that very
    clientOrderId, and the sandbox received (and created) each order once."""
    lgc = sandbox.sandbox.lgc
    rows = ledger(engine)
    assert {c: rows[c]["state"] for c in coids} == dict.fromkeys(coids, "accepted")
    for coid in coids:
        assert rows[coid]["order_item_ids"] == _item_ids(sandbox, coid), coid
        participant = lgc.orders[coid]["body"]["patientInfo"]["participantId"]
        assert participant == "P" + coid.removeprefix("ORD-"), coid  # each body under its own URL
    assert dict(lgc.put_count) == dict.fromkeys(coids, 1)
    assert dict(lgc.accepted_count) == dict.fromkeys(coids, 1)


# ---- 1-3: proxies ------------------------------------------------------------------------------


def test_every_vendor_request_goes_through_the_proxy_of_the_environment(
        run, sandbox, lite_engine, lite_settings, tmp_path, monkeypatch):
    authorize(lite_engine, lite_settings)  # Rupa's consent, before any proxy is set
    path, coids = _orders_csv(tmp_path, 6)
    origin = urlsplit(sandbox.url).netloc
    with ForwardProxy() as proxy:
        _set_proxy_env(monkeypatch, "HTTP_PROXY", proxy.url)
        traffic = Traffic(sandbox, proxy)

        code, out, err = run("load", str(path))
        assert code == 0, out + err
        lgc_calls = traffic.received("/lgc/")
        assert lgc_calls[("POST", "/lgc/oauth2/token")] == 1
        assert {p for (m, p) in lgc_calls if m == "PUT"} == {f"/lgc/DEMO/api/v2/orders/{c}" for c in coids}
        assert sum(lgc_calls.values()) == 1 + len(coids)
        assert traffic.proxied("/") == lgc_calls  # every one of them came through the proxy
        assert all(m != "CONNECT" and urlsplit(t).netloc == origin for m, t in traffic.seen())
        _assert_each_accepted_once(lite_engine, sandbox, coids)

        traffic.mark()
        code, out, err = run("track")
        assert code == 0, out + err
        assert f"tracked {len(coids)} of {len(coids)} orders" in out
        lgc_calls = traffic.received("/lgc/")
        gets = Counter(p for (m, p), n in lgc_calls.items() for _ in range(n) if m == "GET")
        assert gets == Counter(f"/lgc/DEMO/api/v2/orders/{c}" for c in coids)
        assert traffic.proxied("/") == lgc_calls

        traffic.mark()
        sandbox.sandbox.rupa.expire_access_tokens()  # the extract must get a fresh one: a token POST
        code, out, err = run("extract", "patients", "--no-progress")
        assert code == 0, out + err
        rupa_calls = traffic.received("/rupa/")
        assert rupa_calls[("POST", "/rupa/oauth/token")] == 1
        assert rupa_calls[("GET", "/rupa/patients")] >= 50 // 7 + 1  # every page of 7
        assert traffic.proxied("/") == rupa_calls
        assert count(lite_engine, rupa_patients) == 50
        assert proxy.errors == []
    assert proxy.hosts() == {origin}


def test_no_proxy_with_the_address_sends_the_load_straight(run, sandbox, lite_engine, tmp_path, monkeypatch):
    path, coids = _orders_csv(tmp_path, 4)
    with ForwardProxy() as proxy:
        _set_proxy_env(monkeypatch, "HTTP_PROXY", proxy.url)
        _set_proxy_env(monkeypatch, "NO_PROXY", "127.0.0.1")
        traffic = Traffic(sandbox, proxy)
        code, out, err = run("load", str(path))
        assert code == 0, out + err
        assert proxy.seen == [] and proxy.connections == 0
    assert sum(traffic.received("/lgc/").values()) == 1 + len(coids)
    _assert_each_accepted_once(lite_engine, sandbox, coids)


def test_lgc_proxy_setting_carries_the_load_and_only_letsgetchecked(
        run, sandbox, lite_engine, tmp_path, monkeypatch):
    path, coids = _orders_csv(tmp_path, 4)
    with ForwardProxy() as proxy:
        monkeypatch.setenv("LGC_PROXY", proxy.url)  # no proxy variable in the environment
        traffic = Traffic(sandbox, proxy)
        code, out, err = run("load", str(path))
        assert code == 0, out + err
        lgc_calls = traffic.received("/lgc/")
        assert sum(lgc_calls.values()) == 1 + len(coids)
        assert traffic.proxied("/") == lgc_calls
        _assert_each_accepted_once(lite_engine, sandbox, coids)

        traffic.mark()  # Rupa has no proxy of its own: it goes straight
        monkeypatch.setenv("RUPA_API_TOKEN", sandbox.sandbox.rupa.mint_access_token())
        code, out, err = run("extract", "patients", "--no-progress")
        assert code == 0, out + err
        assert traffic.received("/rupa/") and traffic.seen() == []


# ---- 4: mutual TLS -------------------------------------------------------------------------


def _connection(relay, extra: dict) -> SimpleNamespace:
    """An Airflow-style Connection (labsync-lgc): host, login, password, schema, port, extra."""
    return SimpleNamespace(host=f"{relay.url}/lgc", login=None, password=None, schema=None, port=None,
                           extra=json.dumps({"client_id": "DEMO", **extra}))


def _outbox_states(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.client_order_id: r.outcome for r in conn.execute(sa.select(lgc_outbox))}


def _assert_nothing_accepted(engine, sandbox, coids: list[str]) -> None:
    rows = ledger(engine)
    assert all(rows[c]["state"] in FAILURE_STATES for c in coids if c in rows), rows
    assert set(_outbox_states(engine).values()) <= FAILURE_STATES, _outbox_states(engine)
    assert sandbox.sandbox.lgc.put_count == {} and sandbox.sandbox.lgc.orders == {}


def test_mtls_from_connection_extras(sandbox, lite_engine, lite_settings, tls):
    from etl.airflow.hooks import lgc_from_connection

    rows = [order_row(i) for i in range(5)]
    coids = [r["client_order_id"] for r in rows]
    with TlsRelay(sandbox.url, tls) as relay:
        conn = _connection(relay, {"ca_bundle": str(tls.ca_cert), "client_cert": str(tls.client_cert),
                                   "client_key": str(tls.client_key)})
        settings = replace(lite_settings, lgc=replace(lgc_from_connection(conn, lite_settings.lgc),
                                                      concurrency=2, rate_limit=0.0))
        assert settings.lgc.network.client_cert == str(tls.client_cert)
        summary = load_rows(lite_engine, settings, rows)
        assert dict(summary.counts) == {"accepted": 5}
        assert relay.refused == 0
    assert relay.client_subjects and set(relay.client_subjects) == {CLIENT_CN}
    assert relay.count == 1 + len(rows)
    _assert_each_accepted_once(lite_engine, sandbox, coids)


@pytest.mark.parametrize("cert", [None, "other"], ids=["no-client-cert", "foreign-client-cert"])
def test_mtls_refused_without_the_right_client_certificate(sandbox, lite_engine, lite_settings, tls, cert):
    from etl.airflow.hooks import lgc_from_connection

    rows = [order_row(i) for i in range(3)]
    coids = [r["client_order_id"] for r in rows]
    extra = {"ca_bundle": str(tls.ca_cert)}
    if cert == "other":
        extra.update(client_cert=str(tls.other_client_cert), client_key=str(tls.other_client_key))
    with TlsRelay(sandbox.url, tls) as relay:
        lgc = lgc_from_connection(_connection(relay, extra), lite_settings.lgc)
        settings = replace(lite_settings, lgc=replace(lgc, concurrency=2, rate_limit=0.0))
        # with keys: the token request is refused, nothing is claimed or sent
        with pytest.raises(LabsyncError):
            load_rows(lite_engine, settings, rows)
        assert wait_until(lambda: relay.refused > 0), relay.handshake_errors
        _assert_nothing_accepted(lite_engine, sandbox, coids)

        # with a ready token: every PUT is tried and each row ends failed, never accepted
        sandbox.sandbox.lgc.static_tokens.add("ready-token-for-mtls-tests")
        settings = replace(settings, lgc=replace(settings.lgc, api_token="ready-token-for-mtls-tests"))
        summary = load_rows(lite_engine, settings, [order_row(i) for i in range(10, 13)])
        assert summary.counts.get("accepted", 0) == 0 and summary.rows == 3, summary.counts
        assert set(summary.counts) <= FAILURE_STATES, summary.counts
        states = {c: r["state"] for c, r in ledger(lite_engine).items()}
        assert set(states.values()) <= FAILURE_STATES, states
        _assert_nothing_accepted(lite_engine, sandbox, [*coids, "ORD-00010", "ORD-00011", "ORD-00012"])
    assert relay.client_subjects == [] and relay.count == 0
    assert relay.refused > 1


@pytest.mark.airflow
def test_mtls_from_an_airflow_connection(sandbox, lite_engine, lite_settings, tls, monkeypatch):
    from etl.airflow.tasks import airflow_settings

    _base_environment(monkeypatch, lite_settings)
    monkeypatch.delenv("LGC_BASE_URL")
    rows = [order_row(i) for i in range(4)]
    with TlsRelay(sandbox.url, tls) as relay:
        monkeypatch.setenv("AIRFLOW_CONN_LGC_DEFAULT", json.dumps({
            "conn_type": "labsync-lgc", "host": f"{relay.url}/lgc",
            "extra": {"client_id": "DEMO", "ca_bundle": str(tls.ca_cert),
                      "client_cert": str(tls.client_cert), "client_key": str(tls.client_key)}}))
        settings = airflow_settings(require=("lgc",))
        assert settings.lgc.base_url == f"{relay.url}/lgc"
        summary = load_rows(lite_engine, replace(settings, retry=FAST_RETRY), rows)
        assert dict(summary.counts) == {"accepted": 4}
    assert set(relay.client_subjects) == {CLIENT_CN} and relay.refused == 0
    _assert_each_accepted_once(lite_engine, sandbox, [r["client_order_id"] for r in rows])


def test_mtls_from_environment_variables(run, sandbox, lite_engine, tls, tmp_path, monkeypatch):
    path, coids = _orders_csv(tmp_path, 4)
    with TlsRelay(sandbox.url, tls) as relay:
        monkeypatch.setenv("LGC_BASE_URL", f"{relay.url}/lgc")
        monkeypatch.setenv("LGC_CA_BUNDLE", str(tls.ca_cert))

        # only the CA: the relay refuses the handshake, the load fails and accepts nothing
        code, out, err = run("load", str(path))
        assert code in (1, 2), out + err  # 2 when httpx sees the refusal at connect, else 1
        assert "could not get a LetsGetChecked token" in err or "could not reach LetsGetChecked" in err, err
        assert "Traceback" not in err and "accepted" not in out
        assert wait_until(lambda: relay.refused > 0), relay.handshake_errors
        _assert_nothing_accepted(lite_engine, sandbox, coids)

        monkeypatch.setenv("LGC_CLIENT_CERT", str(tls.client_cert))
        monkeypatch.setenv("LGC_CLIENT_KEY", str(tls.client_key))
        refused = relay.refused
        code, out, err = run("load", str(path))
        assert code == 0, out + err
        assert relay.refused == refused
        assert set(relay.client_subjects) == {CLIENT_CN}

        code, out, err = run("track")  # the GETs go through the same TLS settings
        assert code == 0 and f"tracked {len(coids)} of {len(coids)} orders" in out, out + err
    _assert_each_accepted_once(lite_engine, sandbox, coids)


# ---- 5: interim 1xx answers --------------------------------------------------------------------


@pytest.mark.parametrize("interim", [[CONTINUE], [EARLY_HINTS]], ids=["100-continue", "103-early-hints"])
def test_interim_answers_leave_each_order_its_own_answer(run, sandbox, lite_engine, tmp_path, monkeypatch,
                                                         interim):
    path, coids = _orders_csv(tmp_path, 60)
    lifecycle = sandbox.sandbox.lgc.lifecycle
    with InterimRelay(sandbox.url, interim) as relay:
        monkeypatch.setenv("LGC_BASE_URL", f"{relay.url}/lgc")
        monkeypatch.setenv("LGC_CONCURRENCY", "8")
        traffic = Traffic(sandbox)
        code, out, err = run("load", str(path))
        assert code == 0, out + err
        assert "accepted 60" in out
        _assert_each_accepted_once(lite_engine, sandbox, coids)
        assert relay.count == sum(traffic.received("/lgc/").values()) == 61  # a token, 60 PUTs

        # each order in a status of its own, then tracked through the relay
        for n, coid in enumerate(coids):
            lifecycle.advance(coid, steps=n % 5)
        code, out, err = run("track")
        assert code == 0, out + err
        assert "tracked 60 of 60 orders" in out
        assert relay.errors == []
    with lite_engine.connect() as conn:
        stored = {(r.client_order_id, r.item_id): (r.code, r.status, r.barcode, r.outbound_tracking)
                  for r in conn.execute(sa.select(lgc_order_items))}
    expected = {}
    for coid in coids:
        for item in lifecycle.order_json(coid)["orderItems"]:
            status = item["status"] if isinstance(item["status"], str) else item["status"]["code"]
            barcode = (item["lgcKitIdentifier"] or {}).get("numericalCode")
            expected[(coid, item["id"])] = (item["code"], status, barcode,
                                            item["shipment"]["OutboundTrackingNumber"])
    assert stored == expected
    assert len({status for _, status, _, _ in stored.values()}) == 5  # the statuses do differ
    assert dict(sandbox.sandbox.lgc.get_count) == dict.fromkeys(coids, 1)


# ---- 6: numeric settings -----------------------------------------------------------------------

BAD_NUMBERS = [
    *[("LGC_CONCURRENCY", v) for v in ("nan", "inf", "-1", "0")],
    *[("LGC_RATE_LIMIT", v) for v in ("nan", "inf", "-1")],  # 0 means unlimited
    *[(name, v) for name in ("LABSYNC_HTTP_TIMEOUT", "LABSYNC_RETRY_ATTEMPTS", "RUPA_PAGE_SIZE",
                             "LGC_TIMEOUT", "LABSYNC_LEASE_SECONDS")
      for v in ("nan", "inf", "-1", "0")],
]
DAG_ONLY = [("LABSYNC_TASK_TIMEOUT_MINUTES", v) for v in ("nan", "inf", "-1", "0")] + [
    ("LABSYNC_LOAD_TIMEOUT_MINUTES", "0"),
    *[("LABSYNC_LOAD_PARALLELISM", v) for v in ("0", "nan", "-1", "1.5")],
]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """One sandbox, warehouse and batch file for the settings checks (which send nothing)."""
    from etl.sandbox.server import SandboxServer

    root = tmp_path_factory.mktemp("settings")
    url = migrated(f"sqlite:///{root / 'warehouse.db'}")
    (root / "inbox").mkdir()
    path, _ = _orders_csv(root, 2)
    with SandboxServer() as server:
        yield SimpleNamespace(server=server, warehouse_url=url, inbox=root / "inbox", csv=path)
    assert server.sandbox.lgc.put_count == {}  # no bad setting let an order out


@pytest.fixture
def staged(stage, monkeypatch, capsys):
    settings = SimpleNamespace(
        lgc=SimpleNamespace(base_url=stage.server.lgc_url), rupa=SimpleNamespace(base_url=stage.server.rupa_url),
        warehouse_url=stage.warehouse_url, inbox=stage.inbox)
    _base_environment(monkeypatch, settings)
    return _runner(capsys)


def _doctor_names(run, name: str) -> None:
    code, out, err = run("doctor", "--json")
    assert code == 2, out + err
    report = json.loads(out)
    first = report["checks"][0]
    assert report["ok"] is False and first["check"] == "settings" and first["status"] == "problem"
    assert name in first["detail"], first
    assert "Traceback" not in out + err


def test_the_stage_passes_every_check_with_good_settings(staged):
    """The settings checks below fail because of the one bad value, not because of the stage."""
    code, out, err = staged("doctor", "--json")
    checks = {c["check"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks["settings"] == "ok" and checks["warehouse"] == "ok" and checks["LetsGetChecked"] == "ok", out
    code, out, err = staged("track")
    assert code == 0 and "no open order" in out, out + err


@pytest.mark.parametrize(("name", "value"), BAD_NUMBERS, ids=[f"{n}={v}" for n, v in BAD_NUMBERS])
def test_a_bad_number_stops_load_track_and_doctor_naming_it(staged, stage, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    for args in (("load", str(stage.csv)), ("track",)):
        code, out, err = staged(*args)
        assert code == 2, (args, out, err)
        assert err.startswith("labsync: ") and name in err, (args, err)
        assert "Traceback" not in out + err and "this is a bug" not in err
    _doctor_names(staged, name)
    code, out, err = staged("doctor")  # the table names it too
    assert code == 2 and name in out and "Traceback" not in out + err


@pytest.mark.parametrize(("name", "value"), DAG_ONLY, ids=[f"{n}={v}" for n, v in DAG_ONLY])
def test_a_bad_dag_setting_fails_doctor_naming_it(staged, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    _doctor_names(staged, name)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", float("nan"), float("inf"), -1, 0])
def test_a_bad_timeout_extra_of_a_connection_is_refused_naming_it(lite_settings, value):
    """The Airflow reader of the network settings checks the same ranges as the environment's."""
    from etl.airflow.hooks import lgc_from_connection, rupa_from_connection
    from etl.errors import ConfigError

    conn = SimpleNamespace(host="https://api.example.com", login=None, password=None, schema=None,
                           port=None, extra=json.dumps({"timeout": value}))
    with pytest.raises(ConfigError, match="LGC_TIMEOUT"):
        lgc_from_connection(conn, lite_settings.lgc)
    with pytest.raises(ConfigError, match="RUPA_TIMEOUT"):
        rupa_from_connection(conn, lite_settings.rupa)


# ---- numbers that once crashed (exit 3) instead of naming themselves -------------------------


@pytest.mark.parametrize("args", [("track", "--stale-minutes", "nan"), ("track", "--stale-minutes", "inf"),
                                  ("lifecycle", "--stale-minutes", "nan")], ids=" ".join)
def test_a_bad_stale_minutes_option_is_a_usage_error(staged, args):
    code, out, err = staged(*args)
    assert "this is a bug" not in err, err
    assert code == 2 and "stale" in err.lower(), (code, out, err)


@pytest.mark.parametrize(("name", "value", "args"), [
    ("LABSYNC_LEASE_SECONDS", "1e12", ("load", "{csv}")),
    ("LABSYNC_TRACK_STALE_MINUTES", "1e10", ("lifecycle",)),
], ids=["lease-load", "stale-lifecycle"])
def test_a_huge_finite_setting_is_refused_or_works_never_a_crash(run, tmp_path, monkeypatch, name, value, args):
    path, _ = _orders_csv(tmp_path, 2)
    monkeypatch.setenv(name, value)
    code, out, err = run(*(a.format(csv=path) for a in args))
    assert "this is a bug" not in err and code != 3, (code, err)
    if code == 2:
        assert name in err, err
