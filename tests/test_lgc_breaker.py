"""Deadlines and the circuit breaker (etl.lgc.breaker), over real HTTP against the sandbox and
checked in the ledger (SQLite and PostgreSQL): a vendor that never answers, one that fails every
request, one that asks to wait an hour, and a load that runs out of time. Every row ends
`failed` with a true reason and goes out on the next run."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace

import pytest

from etl.errors import ApiError, ConfigError
from etl.lgc.breaker import Breaker, Tripped
from etl.orders.load import load_rows
from etl.settings import RetrySettings, Settings
from tests.test_lgc_support import (
    LABSYNC,
    cli_env,
    csv_row,
    fast,
    ledger,
    order_row,
    outbox_rows,
    write_csv,
)


def _lgc(sandbox):
    return sandbox.sandbox.lgc


def _puts(sandbox) -> int:
    """Order PUTs that reached the vendor, faults included."""
    return _lgc(sandbox).traffic.snapshot()["puts"]



def outcomes(engine) -> dict[str, dict]:
    """Each row's outcome in the first batch's outbox (rows the breaker kept from being read are
    never claimed, so the outbox, not the ledger, is where every row's outcome is)."""
    return {coid: {**r, "state": r["outcome"]} for coid, r in outbox_rows(engine, 1).items()}


def test_a_vendor_that_never_answers_ends_the_batch_within_the_deadline(engine, settings, sandbox):
    """1,000 rows, a vendor that accepts connections and never answers: the breaker opens after
    10 timed-out attempts, nothing more is sent, every row is `failed` with a true reason, and
    it all ends long before the deadline. The next run sends every row."""
    lgc = _lgc(sandbox)
    lgc.faults.update(hang=True, exempt_paths=["/lgc/oauth2"])
    retry = RetrySettings(max_attempts=3, initial_wait=0.01, max_wait=0.05, timeout=0.5)
    s = fast(settings, concurrency=8, retry=retry, breaker_failures=10, load_deadline=100)
    rows = [order_row(i) for i in range(1000)]
    started = time.monotonic()
    summary = load_rows(engine, s, rows)
    elapsed = time.monotonic() - started
    assert elapsed < 100  # behaviour, not speed: it ends before its own deadline would
    assert summary.counts == {"failed": 1000}
    assert summary.stopped == "LetsGetChecked failed 10 times in a row (timed out)"
    assert summary.exit_code == 1
    # the breaker let at most one attempt per worker start after the 10th failure began
    assert lgc.faults.injected["hung"] <= 10 + 8
    book = outcomes(engine)
    assert len(book) == 1000 and {r["state"] for r in book.values()} == {"failed"}
    assert all(r["claimed_by"] is None for r in ledger(engine).values())
    never = [r for r in book.values() if r["attempts"] == 0]
    tried = [r for r in book.values() if r["attempts"] > 0]
    assert len(never) >= 1000 - 18 and 1 <= len(tried) <= 18
    assert {r["last_error"] for r in never} == {
        "not sent: LetsGetChecked failed 10 times in a row (timed out); sent again on the next run"
    }
    for r in tried:  # their own cause first, then why they were not tried again ...
        assert r["last_error"].startswith("timed out (ReadTimeout)"), r["last_error"]
        # ... unless a worker used up its own attempts as the breaker tripped: then its own
        # cause alone is the true reason
        assert (r["last_error"].endswith(", then the batch stopped: LetsGetChecked failed 10 "
                                         "times in a row (timed out); sent again on the next run")
                or r["last_error"] == f"timed out (ReadTimeout) ({retry.max_attempts} attempts)"
                ), r["last_error"]

    lgc.faults.update(hang=False)
    again = load_rows(engine, s, rows)
    assert again.counts == {"accepted": 1000} and not again.stopped
    assert set(lgc.accepted_count.values()) == {1} and len(lgc.orders) == 1000


def test_the_breaker_opens_after_n_failures_and_the_next_run_sends_the_rows(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"], seed=1)
    s = fast(settings, concurrency=1, breaker_failures=3)  # FAST_RETRY: 5 attempts per row
    rows = [order_row(i) for i in range(20)]
    summary = load_rows(engine, s, rows)
    assert summary.counts == {"failed": 20}
    assert _puts(sandbox) == 3  # the third failure in a row opened it; nothing after
    book = outcomes(engine)
    first = ledger(engine)["ORD-00000"]  # the ledger counts HTTP attempts; the outbox, loads
    assert first["attempts"] == 3 and first["http_status"] in (500, 503)
    assert book["ORD-00000"]["attempts"] == 1 and book["ORD-00000"]["last_error"] == first["last_error"]
    assert first["last_error"].startswith("HTTP 50")
    assert "(3 attempts), then the batch stopped: LetsGetChecked failed 3 times in a row (HTTP 5" \
        in first["last_error"]
    assert all(book[f"ORD-{i:05d}"]["last_error"].startswith("not sent: LetsGetChecked failed 3 times")
               for i in range(1, 20))

    lgc.faults.reset()
    again = load_rows(engine, s, rows)
    assert again.counts == {"accepted": 20} and again.sent == 20


def test_answers_between_failures_keep_the_breaker_closed(engine, settings, sandbox):
    """Consecutive means consecutive: a good answer resets the count, and 429s within the cap
    are the vendor pacing us, not failing."""
    lgc = _lgc(sandbox)
    script = [503, 503, 503, None, 429, 429, 429, 429, None, 500, 500, 500, None]
    lgc.faults.update(script=script, retry_after=0.01, exempt_paths=["/lgc/oauth2"])
    retry = RetrySettings(max_attempts=10, initial_wait=0.01, max_wait=0.02, timeout=5)
    s = fast(settings, concurrency=1, retry=retry, breaker_failures=4)
    summary = load_rows(engine, s, [order_row(i) for i in range(3)])
    assert summary.counts == {"accepted": 3} and not summary.stopped


def test_a_huge_retry_after_fails_fast_with_the_cap_in_the_reason(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.faults.update(throttle_rate=1.0, retry_after=3600, exempt_paths=["/lgc/oauth2"])
    s = fast(settings, concurrency=2, max_retry_after=60)
    started = time.monotonic()
    summary = load_rows(engine, s, [order_row(1), order_row(2)])
    assert time.monotonic() - started < 60  # it did not sleep on the vendor's say-so
    assert summary.counts == {"failed": 2}
    for row in outcomes(engine).values():
        assert row["http_status"] == 429 and row["attempts"] == 1
        assert row["last_error"] == (
            "HTTP 429: LetsGetChecked asked to wait 3600s (Retry-After), more than "
            "LGC_MAX_RETRY_AFTER (60s); sent again on the next run"
        )
    assert _puts(sandbox) == 2


def test_a_token_endpoint_asking_to_wait_an_hour_fails_before_any_row(engine, settings, sandbox):
    _lgc(sandbox).faults.update(throttle_rate=1.0, retry_after=3600)
    started = time.monotonic()
    with pytest.raises(ApiError, match=r"HTTP 429 asking to wait 3600s \(Retry-After\), longer than the 60s cap"):
        load_rows(engine, fast(settings, max_retry_after=60), [order_row(1)])
    assert time.monotonic() - started < 60
    assert ledger(engine) == {} and _lgc(sandbox).faults.injected["throttled"] == 1  # asked once


def test_too_long_retry_after_answers_count_toward_the_breaker(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.faults.update(throttle_rate=1.0, retry_after=600, exempt_paths=["/lgc/oauth2"])
    s = fast(settings, concurrency=1, max_retry_after=60, breaker_failures=3)
    summary = load_rows(engine, s, [order_row(i) for i in range(10)])
    assert summary.counts == {"failed": 10}
    assert summary.stopped == "LetsGetChecked failed 3 times in a row (HTTP 429 with Retry-After 600s)"
    assert _puts(sandbox) == 3


def test_the_deadline_stops_new_requests_and_fails_the_rest_with_that_reason(engine, settings, sandbox):
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.2)
    s = fast(settings, concurrency=2, load_deadline=1.0)
    rows = [order_row(i) for i in range(60)]
    summary = load_rows(engine, s, rows)
    book = outcomes(engine)
    accepted = [r for r in book.values() if r["state"] == "accepted"]
    failed = [r for r in book.values() if r["state"] == "failed"]
    assert len(accepted) + len(failed) == 60 and accepted and failed
    assert summary.counts == {"accepted": len(accepted), "failed": len(failed)}
    assert summary.stopped.startswith("deadline reached")
    assert {r["last_error"] for r in failed} == {
        "not sent: deadline reached (LGC_LOAD_DEADLINE 1s after the load started); "
        "sent again on the next run"
    }
    assert _puts(sandbox) == len(accepted)  # nothing started after the deadline
    lgc.faults.reset()
    again = load_rows(engine, fast(settings, concurrency=2), rows)  # a new batch of the same rows
    assert again.counts == {"accepted": len(failed), "already_settled": len(accepted)}
    assert again.sent == len(failed)


def test_the_cli_reads_the_breaker_settings_and_says_why_the_batch_stopped(engine, settings, sandbox, tmp_path):
    _lgc(sandbox).faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"])
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(5)])
    env = cli_env(fast(settings, concurrency=1), LGC_BREAKER_FAILURES="2")
    out = subprocess.run([*LABSYNC, "load", str(path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr
    assert "the batch stopped early: LetsGetChecked failed 2 times in a row" in out.stderr
    assert "failed 5" in out.stdout
    assert _puts(sandbox) == 2


def test_breaker_counts_failures_in_a_row():
    causes = []
    b = Breaker(3, on_trip=causes.append)
    b.failure("HTTP 503")
    b.failure("timed out")
    b.success()
    b.failure("HTTP 503")
    b.failure("HTTP 503")
    assert not b.tripped
    b.failure("timed out")
    assert b.tripped and causes == ["LetsGetChecked failed 3 times in a row (HTTP 503 / timed out)"]
    with pytest.raises(Tripped):
        b.check()
    off = Breaker(0)
    for _ in range(100):
        off.failure("HTTP 500")
    assert not off.tripped


def test_breaker_sleep_ends_when_it_opens():
    async def go() -> float:
        b = Breaker(1).start()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, b.failure, "HTTP 500")
        t = loop.time()
        await b.sleep(3600)
        return loop.time() - t

    assert asyncio.run(go()) < 60


def test_settings_read_and_check_the_breaker_variables():
    s = Settings.from_env({"LGC_MAX_RETRY_AFTER": "5", "LGC_BREAKER_FAILURES": "0",
                           "LGC_LOAD_DEADLINE": "120"})
    assert (s.lgc.max_retry_after, s.lgc.breaker_failures, s.lgc.load_deadline) == (5.0, 0, 120.0)
    d = Settings().lgc
    assert (d.max_retry_after, d.breaker_failures, d.load_deadline) == (60.0, 10, 900.0)
    for name in ("LGC_MAX_RETRY_AFTER", "LGC_BREAKER_FAILURES", "LGC_LOAD_DEADLINE"):
        with pytest.raises(ConfigError, match=name):
            replace(Settings.from_env({name: "-1"}).lgc).validated()
