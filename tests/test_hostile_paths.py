"""Issue 10, point 1: ids that travel in a URL path can only reach the intended endpoint.

Each hostile id is either refused (by validation, and again by the URL builder as a final guard)
or reaches the sandbox at exactly `/lgc/DEMO/api/v2/orders/{id}` (Rupa: `/rupa/patients/{id}`).
The sandbox records the raw path of every request it receives, before any routing, so an id
that the HTTP stack normalised away shows up under the path it really reached."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from etl import cli
from etl.errors import ConfigError, LabsyncError
from etl.http import make_async_client
from etl.lgc.auth import TokenProvider
from etl.lgc.client import LgcClient
from etl.orders.payload import build_payload
from etl.rupa.client import open_client
from etl.settings import RupaSettings, Settings
from tests.conftest import FAST_RETRY
from tests.helpers import read_rejects
from tests.test_lgc_support import cli_env, csv_row, fast, ledger, order_row, write_csv

ORDERS = b"/lgc/DEMO/api/v2/orders/"

# ids that must reach the orders endpoint unchanged: letters, digits and - _ . ~ only
SAFE_IDS = ["ORD-0001", "a.b_c~d-1", "X", "1234567", "a" * 100]

# ids that cannot be sent safely: dot segments, separators, percent signs, controls, look-alikes
UNSAFE_IDS = [
    ".", "..", "...", "../../oauth2/token", "A/../B", "A/B", "%2e%2e", "%2F", "a%00",
    "a\\b", "..\\..\\x", "a?b=1", "a#frag", "a b", "a\tb", "a;jsessionid=1", "a:b", "a@b",
    "\uff0e\uff0e",  # fullwidth full stops: NFKC makes them ".."
    "\uff0fx",  # fullwidth solidus
    "a\u2215b",  # division slash
    "é", "ORD.", ".ORD", "a..b", "a\u202eb", "a\u200bb", "=HYPERLINK(1)",
]
CONTROL_IDS = ["a\nb", "a\rb", "a\x00b", "a\x1bb", "\x7f"]  # cannot even be written in a CSV row


def _put(settings: Settings, coid: str):
    body = build_payload(order_row(1))

    async def go():
        lgc = settings.lgc.validated()
        async with make_async_client("", settings.retry) as http:
            client = LgcClient(lgc, settings.retry, http, TokenProvider(lgc, settings.retry))
            return await client.put_order(coid, body, json.dumps(body).encode())

    return asyncio.run(go())


@pytest.fixture(scope="module")
def shared_sandbox():
    """One sandbox for the whole table (each case clears what it recorded)."""
    from etl.sandbox.server import SandboxServer

    with SandboxServer() as server:
        yield server


@pytest.fixture
def bare(shared_sandbox):
    shared_sandbox.sandbox.received.clear()
    shared_sandbox.sandbox.lgc.reset()
    base = Settings()
    return replace(base, lgc=replace(base.lgc, base_url=shared_sandbox.lgc_url), retry=FAST_RETRY)


@pytest.mark.parametrize("coid", SAFE_IDS + UNSAFE_IDS + CONTROL_IDS, ids=repr)
def test_the_client_reaches_exactly_the_orders_endpoint_or_sends_nothing(bare, shared_sandbox, coid):
    outcome = _put(bare, coid)
    puts = shared_sandbox.sandbox.paths("PUT")
    if coid in SAFE_IDS:
        assert puts == [ORDERS + coid.encode()]
        assert outcome.state == "accepted"
    else:
        assert puts == [], f"{coid!r} reached {puts}"
        assert outcome.state == "rejected" and outcome.attempts == 0
        assert "cannot be sent safely" in outcome.error
        assert "\n" not in outcome.error and "\r" not in outcome.error


@pytest.fixture(scope="module")
def validated_ids(tmp_path_factory):
    """Every id of the table in one file, validated once: {id: the problems of its row}."""
    from etl.intake.validate import validate_file

    ids = SAFE_IDS + UNSAFE_IDS
    path = write_csv(tmp_path_factory.mktemp("ids") / "ids.csv",
                     [csv_row(i, client_order_id=c) for i, c in enumerate(ids)])
    result = validate_file(path)
    problems = read_rejects(result.rejects_path) if result.rejects_path else []
    return {c: [p for p in problems if p["line"] == str(i + 2)] for i, c in enumerate(ids)}


@pytest.mark.parametrize("coid", UNSAFE_IDS, ids=repr)
def test_validation_rejects_ids_that_cannot_be_sent_safely(validated_ids, coid):
    problems = validated_ids[coid]
    assert [p["column"] for p in problems] == ["client_order_id"]
    assert "letters, digits" in problems[0]["reason"] and "URL" in problems[0]["reason"]


@pytest.mark.parametrize("coid", SAFE_IDS, ids=repr)
def test_validation_keeps_ids_that_travel_unchanged(validated_ids, coid):
    assert validated_ids[coid] == []


def test_hostile_ids_in_a_batch_reach_only_the_orders_endpoint(settings, sandbox, engine, tmp_path, monkeypatch, capsys):
    """The must-show check, end to end through `labsync load` (validation, loader, client)."""
    ids = SAFE_IDS + UNSAFE_IDS
    path = write_csv(tmp_path / "hostile.csv", [csv_row(i, client_order_id=c) for i, c in enumerate(ids)])
    for key, value in cli_env(fast(settings, concurrency=2)).items():
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.setenv(key, value)
    assert cli.main(["load", str(path)]) == 1
    capsys.readouterr()
    puts = sandbox.sandbox.paths("PUT")
    assert sorted(puts) == sorted(ORDERS + c.encode() for c in SAFE_IDS)
    assert set(sandbox.sandbox.lgc.orders) == set(SAFE_IDS)
    assert set(ledger(engine)) == set(SAFE_IDS)
    rejected = {r["client_order_id"] for r in read_rejects(tmp_path / "hostile.rejects.csv")}
    assert len(rejected) == len(UNSAFE_IDS)


RUPA_SAFE = ["pat_0000007"]
RUPA_UNSAFE = ["../lab_tests", "pat_0000007/../../lab_tests", "%2e%2e", "..", ".", "a?b=1",
               "a#b", "\uff0e\uff0e", "a/b", "a\nb", "", "a b"]


@pytest.mark.parametrize("rid", RUPA_SAFE + RUPA_UNSAFE, ids=repr)
def test_rupa_ids_reach_only_their_resource(sandbox, tmp_path, rid):
    rupa = sandbox.sandbox.rupa
    settings = Settings(warehouse_url=f"sqlite:///{tmp_path / 'w.db'}", retry=FAST_RETRY,
                        rupa=RupaSettings(base_url=sandbox.rupa_url, api_token=rupa.mint_access_token()))
    with open_client(settings) as client:
        if rid in RUPA_SAFE:
            assert client.get_patient(rid)["id"] == rid
            assert sandbox.sandbox.paths("GET") == [b"/rupa/patients/" + rid.encode()]
            return
        with pytest.raises(LabsyncError) as info:
            client.get_patient(rid)
    assert "cannot be sent safely" in str(info.value) and "\n" not in str(info.value)
    assert sandbox.sandbox.paths("GET") == []


@pytest.mark.parametrize("name,value", [
    ("LGC_CLIENT_ID", ".."), ("LGC_CLIENT_ID", "A/B"), ("LGC_CLIENT_ID", "A%2F"),
    ("LGC_BASE_URL", "http://127.0.0.1:8765/lgc?x=1"), ("LGC_BASE_URL", "http://127.0.0.1:8765/lgc#x"),
    ("LGC_BASE_URL", "ftp://127.0.0.1/lgc"), ("LGC_BASE_URL", "http://127.0.0.1:8765/lgc/../x"),
    ("RUPA_BASE_URL", "http://127.0.0.1:8765/rupa?x=1"), ("RUPA_BASE_URL", "http://127.0.0.1:8765/rupa#x"),
])
def test_settings_refuse_path_parts_that_would_not_round_trip(name, value):
    settings = Settings.from_env({name: value})
    with pytest.raises(ConfigError) as info:
        settings.lgc.validated() if name.startswith("LGC") else settings.rupa.validated()
    assert name in str(info.value)
