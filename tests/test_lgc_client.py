"""Every status-code path of the PUT, against the sandbox as a real loopback server, through
`load_rows` so each outcome is also checked in the ledger (SQLite and PostgreSQL); and the token
rules: fetched once for concurrent requests, refreshed once on 401, a 401 after a refresh stops
the batch."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest

from etl.errors import AuthError
from etl.http import make_async_client
from etl.lgc.auth import TokenProvider
from etl.lgc.client import LgcClient, vendor_reason
from etl.orders.load import STOPPED_ERROR, load_rows
from etl.settings import RetrySettings, Settings
from tests.conftest import FAST_RETRY
from tests.test_lgc_support import fast, ledger, order_row, put_item


def _lgc(sandbox):
    return sandbox.sandbox.lgc


@pytest.fixture
def lite(lite_engine):
    """A SQLite warehouse only, for tests about HTTP behaviour rather than the ledger."""
    return lite_engine


@pytest.fixture
def bare(sandbox):
    """Settings for tests that need no warehouse (not parametrised over SQLite/PostgreSQL)."""
    base = Settings()
    return replace(base, lgc=replace(base.lgc, base_url=sandbox.lgc_url), retry=FAST_RETRY)


def test_202_accepted_stores_the_order_item_ids(engine, settings, sandbox):
    summary = load_rows(engine, fast(settings), [order_row(1), order_row(2)], batch_id=None)
    assert summary.counts == {"accepted": 2} and summary.exit_code == 0
    rows = ledger(engine)
    for coid in ("ORD-00001", "ORD-00002"):
        row = rows[coid]
        assert row["state"] == "accepted" and row["http_status"] == 202 and row["attempts"] == 1
        assert row["order_item_ids"] == _lgc(sandbox).orders[coid]["response"]["orderItems"]
        assert row["claimed_by"] is None and row["last_error"] is None
        assert len(row["payload_sha256"]) == 64


def test_400_rejected_keeps_the_vendors_reason_without_phi(engine, settings, sandbox):
    _lgc(sandbox).forced["ORD-00001"] = 400
    bad_dob = order_row(2, dob="1961-02-30")  # passes a naive check, not the vendor's calendar
    summary = load_rows(engine, fast(settings), [order_row(1), bad_dob])
    assert summary.counts == {"rejected": 2} and summary.exit_code == 1
    rows = ledger(engine)
    eligible = rows["ORD-00001"]["last_error"]
    assert eligible.startswith("HTTP 400 Participant not eligible")  # the title; never the detail
    for phi in ("Ada", "Lovelace", "1961-02-11", "ada1@example.org", "5550100001"):
        assert phi not in eligible
    dob = rows["ORD-00002"]["last_error"]
    assert "fields: patientInfo.dob" in dob and "1961-02-30" not in dob
    assert rows["ORD-00002"]["http_status"] == 400 and rows["ORD-00002"]["attempts"] == 1


def test_409_conflict_is_not_retried_and_not_an_error(engine, settings, sandbox):
    load_rows(engine, fast(settings), [order_row(1)])
    # the same clientOrderId, different data, from a warehouse that never saw the first
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM lgc_orders")
    summary = load_rows(engine, fast(settings), [order_row(1, order_items="GLCS")])
    assert summary.counts == {"conflict": 1} and summary.exit_code == 0
    row = ledger(engine)["ORD-00001"]
    assert row["state"] == "conflict" and row["http_status"] == 409 and row["attempts"] == 1
    assert _lgc(sandbox).put_count["ORD-00001"] == 2


def test_client_errors_fail_with_a_clear_cause_without_retry(engine, settings, sandbox):
    statuses = {"ORD-00001": 406, "ORD-00002": 410, "ORD-00003": 415}
    _lgc(sandbox).forced.update(statuses)
    summary = load_rows(engine, fast(settings), [order_row(i) for i in (1, 2, 3)])
    assert summary.counts == {"failed": 3} and summary.exit_code == 1 and not summary.stopped
    rows = ledger(engine)
    for coid, status in statuses.items():
        row = rows[coid]
        assert row["state"] == "failed" and row["http_status"] == status and row["attempts"] == 1
        assert f"HTTP {status}" in row["last_error"]
    assert sum(_lgc(sandbox).put_count.values()) == 3


def test_unknown_client_id_is_404_failed(engine, settings, sandbox):
    settings = replace(settings, lgc=replace(settings.lgc, client_id="ZZZ"))
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {"failed": 1} and not summary.stopped
    row = ledger(engine)["ORD-00001"]
    assert row["http_status"] == 404 and "clientId" in row["last_error"] and row["attempts"] == 1


def test_transient_faults_are_retried_then_accepted_once(engine, settings, sandbox):
    faults = [500, 503, 429, "drop"]
    # one row at a time: each gets two faults, then is served (None in a script = serve)
    _lgc(sandbox).faults.update(script=[f for fault in faults for f in (fault, fault, None)],
                                retry_after=0.05, exempt_paths=["/lgc/oauth2"])
    rows = [order_row(i) for i in range(len(faults))]
    summary = load_rows(engine, fast(settings, concurrency=1), rows)
    assert summary.counts == {"accepted": 4}
    assert _lgc(sandbox).faults.injected == {"errors": 4, "throttled": 2, "dropped": 2}
    for coid, row in ledger(engine).items():
        assert row["attempts"] == 3
        assert _lgc(sandbox).accepted_count[coid] == 1
        assert row["order_item_ids"] == _lgc(sandbox).orders[coid]["response"]["orderItems"]


def test_retry_budget_exhausted_is_failed_and_a_rerun_sends_it(engine, settings, sandbox):
    retry = RetrySettings(max_attempts=3, initial_wait=0.01, max_wait=0.02, timeout=5)
    _lgc(sandbox).faults.update(script=[503, 503, 503], exempt_paths=["/lgc/oauth2"])
    summary = load_rows(engine, fast(settings, retry=retry), [order_row(1)])
    assert summary.counts == {"failed": 1}
    row = ledger(engine)["ORD-00001"]
    assert row["state"] == "failed" and row["http_status"] == 503 and row["attempts"] == 3
    assert "503" in row["last_error"]
    again = load_rows(engine, fast(settings, retry=retry), [order_row(1)])
    assert again.counts == {"accepted": 1} and again.sent == 1
    assert ledger(engine)["ORD-00001"]["attempts"] == 4


def test_retry_after_is_honoured(engine, settings, sandbox):
    _lgc(sandbox).faults.update(script=[429], retry_after=0.4, exempt_paths=["/lgc/oauth2"])
    summary = load_rows(engine, fast(settings), [order_row(1)])
    assert summary.counts == {"accepted": 1}
    assert summary.elapsed >= 0.4  # FAST_RETRY's own backoff is at most 0.05s


def test_token_is_fetched_once_for_many_concurrent_orders(engine, settings, sandbox):
    _lgc(sandbox).faults.update(latency=0.01)
    summary = load_rows(engine, fast(settings, concurrency=10), [order_row(i) for i in range(60)])
    assert summary.counts == {"accepted": 60}
    assert _lgc(sandbox).token_requests == 1 and summary.token_fetches == 1


def test_concurrent_callers_share_one_token_fetch(bare, sandbox):
    settings = bare
    _lgc(sandbox).faults.update(latency=0.05)  # the token request is slow: all callers wait on it

    async def go():
        async with make_async_client("", settings.retry) as http:
            tokens = TokenProvider(settings.lgc.validated(), settings.retry)
            got = await asyncio.gather(*(tokens.token(http) for _ in range(20)))
        return got, tokens.fetches

    got, fetches = asyncio.run(go())
    assert len(set(got)) == 1 and fetches == 1 and _lgc(sandbox).token_requests == 1


def test_a_401_refreshes_the_token_once_for_all_requests_holding_it(bare, sandbox):
    settings = bare
    lgc_state = _lgc(sandbox)

    async def go():
        lgc = settings.lgc.validated()
        async with make_async_client("", settings.retry, concurrency=20) as http:
            tokens = TokenProvider(lgc, settings.retry)
            client = LgcClient(lgc, settings.retry, http, tokens)
            await tokens.token(http)
            lgc_state.expire_tokens()  # every request now holds a stale token
            items = [put_item(order_row(i)) for i in range(20)]
            return await asyncio.gather(
                *(client.put_order(i.client_order_id, i.body, i.content) for i in items)
            )

    outcomes = asyncio.run(go())
    assert {o.state for o in outcomes} == {"accepted"}
    assert lgc_state.token_requests == 2  # the first token, and exactly one refresh
    assert lgc_state.status_count[401] == 20 and lgc_state.status_count[202] == 20


def test_expiring_tokens_are_renewed_before_they_run_out(lite, bare, sandbox):
    engine, settings = lite, bare
    _lgc(sandbox).token_ttl = 0.4
    rows = [order_row(i) for i in range(30)]
    summary = load_rows(engine, fast(settings, concurrency=2, rate_limit=30), rows)
    assert summary.counts == {"accepted": 30}
    assert summary.token_fetches >= 2


def test_a_401_after_the_refresh_stops_the_batch(engine, settings, sandbox):
    lgc_state = _lgc(sandbox)
    lgc_state.reject_tokens = True
    rows = [order_row(i) for i in range(40)]
    summary = load_rows(engine, fast(settings, concurrency=2), rows)
    assert summary.stopped and "401" in summary.stopped and summary.exit_code == 2
    assert summary.counts == {"failed": 40}
    # each worker: one PUT, one refresh, one more PUT; then nothing more is sent
    assert sum(lgc_state.put_count.values()) <= 4
    rows_now = ledger(engine)
    assert {r["state"] for r in rows_now.values()} == {"failed"}
    assert sum(r["last_error"] == STOPPED_ERROR for r in rows_now.values()) >= 36
    assert all(r["claimed_by"] is None for r in rows_now.values())
    lgc_state.reject_tokens = False  # credentials fixed: the rerun sends everything
    again = load_rows(engine, fast(settings, concurrency=2), rows)
    assert again.counts == {"accepted": 40}


def test_a_static_token_refused_stops_without_a_refresh(lite, bare, sandbox):
    engine, settings = lite, bare
    lgc = replace(settings.lgc, api_token="not-a-valid-token", access_key=None, secret_key=None)
    summary = load_rows(engine, fast(replace(settings, lgc=lgc), concurrency=1), [order_row(1), order_row(2)])
    assert summary.exit_code == 2 and summary.counts == {"failed": 2}
    assert _lgc(sandbox).token_requests == 0
    assert sum(_lgc(sandbox).put_count.values()) == 1


def test_a_ready_token_is_used_as_is(lite, bare, sandbox):
    engine, settings = lite, bare
    _lgc(sandbox).static_tokens.add("ready-token-0123456789")
    lgc = replace(settings.lgc, api_token="ready-token-0123456789", access_key=None, secret_key=None)
    summary = load_rows(engine, fast(replace(settings, lgc=lgc)), [order_row(1)])
    assert summary.counts == {"accepted": 1} and _lgc(sandbox).token_requests == 0


def test_refused_keys_fail_before_any_row_is_touched(engine, settings, sandbox):
    lgc = replace(settings.lgc, access_key="a" * 25, secret_key="b" * 25)
    with pytest.raises(AuthError) as info:
        load_rows(engine, replace(settings, lgc=lgc), [order_row(1)])
    assert "a" * 25 not in str(info.value) and "b" * 25 not in str(info.value)
    assert ledger(engine) == {}


def test_rate_limit_spaces_requests(lite, bare, sandbox):
    engine, settings = lite, bare
    summary = load_rows(engine, fast(settings, concurrency=8, rate_limit=40), [order_row(i) for i in range(20)])
    assert summary.counts == {"accepted": 20}
    assert summary.elapsed >= 19 / 40 * 0.95


def test_vendor_reason_keeps_structured_parts_and_drops_free_text():
    body = {"patientInfo": {"firstName": "Zelda", "email": "z@x.org"}}
    answer = httpx.Response(400, json={
        "title": "Participant not eligible", "detail": "zelda (z@x.org) born 1970-01-02, call +1 555 010 9999",
        "errors": {"patientInfo.email": ["z@x.org is taken"]}})
    assert vendor_reason(answer, body) == "HTTP 400 Participant not eligible; fields: patientInfo.email"
    plain = httpx.Response(400, text="zelda (z@x.org) is already enrolled")
    assert vendor_reason(plain, body) == "HTTP 400 Bad Request"


def test_an_id_that_would_not_travel_unchanged_is_never_sent(bare, sandbox):
    """(tests/test_hostile_paths.py has the full table against the sandbox.)"""
    settings = bare
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(202, json={"clientOrderId": "A-1", "orderItems": [{"code": "X", "id": "1"}]})

    async def go(coid):
        lgc = replace(settings.lgc, api_token="t").validated()
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = LgcClient(lgc, settings.retry, http, TokenProvider(lgc, settings.retry))
            return await client.put_order(coid, {}, b"{}")

    refused = asyncio.run(go("A/B é?x"))
    assert refused.state == "rejected" and refused.attempts == 0 and seen == []
    assert asyncio.run(go("A-1")).state == "accepted"
    assert seen == [b"/lgc/DEMO/api/v2/orders/A-1"]
