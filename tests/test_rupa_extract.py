"""Extraction over real HTTP from the Rupa sandbox into SQLite and PostgreSQL: paging, re-runs,
updates and disappearances, a SIGKILLed run completed by the next, fault storms, tokens that
expire or are rotated mid-run, and no PHI or tokens in any log line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest
import sqlalchemy as sa
from starlette.responses import Response

from etl.extract.streams import extract_stream, live_count
from etl.rupa.auth import OAuthTokens, TokenStore
from etl.settings import RetrySettings
from etl.warehouse import rupa_lab_tests, rupa_patients
from tests.conftest import REPO
from tests.rupa_support import authorize, cli_env, count, state_of, with_rupa

N_PATIENTS = 50  # the sandbox fixture's default
N_LAB_TESTS = 20


@pytest.fixture
def rupa(sandbox):
    return sandbox.sandbox.rupa


def _ids(engine, table) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.id).where(table.c.deleted_at.is_(None))).scalars())


def test_multi_page_extraction_then_a_rerun_changes_nothing(engine, settings, rupa):
    settings = with_rupa(settings, page_size=7)
    authorize(engine, settings)

    first = extract_stream(engine, settings, "patients")
    labs = extract_stream(engine, settings, "lab-tests")

    assert (first.inserted, first.updated, first.unchanged, first.deleted) == (N_PATIENTS, 0, 0, 0)
    assert first.pages == 8  # 50 rows, 7 a page
    assert labs.inserted == N_LAB_TESTS and labs.pages == 3
    assert _ids(engine, rupa_patients) == set(rupa.patient_ids())
    with engine.connect() as conn:
        row = conn.execute(sa.select(rupa_patients).where(rupa_patients.c.id == "pat_0000003")).mappings().one()
        lab = conn.execute(sa.select(rupa_lab_tests).where(rupa_lab_tests.c.id == "labts_0000002")).mappings().one()
    api = rupa.patient("pat_0000003")["attributes"]
    assert (row["first_name"], row["last_name"], row["email"], row["birthday"]) == (
        api["first_name"], api["last_name"], api["email"], api["birthday"])
    assert row["attributes"] == api and row["relationships"]["clinic"]["data"]["id"] == "clinic_sandbox"
    assert row["updated_at"] is not None and row["deleted_at"] is None
    assert lab["name"] and lab["lab_name"] and lab["relationships"]["lab_company"]["data"]["type"] == "lab_company"
    state = state_of(engine, "patients")
    assert state["status"] == "succeeded" and state["resume_url"] is None and state["inserted"] == N_PATIENTS

    again = extract_stream(engine, settings, "patients")
    assert (again.inserted, again.updated, again.unchanged, again.deleted) == (0, 0, N_PATIENTS, 0)
    assert count(engine, rupa_patients) == N_PATIENTS


def _extract_with_a_slow_first_write(engine, settings, rupa):
    """Extract patients 5 a page, each page 50 ms away, the first write held up for a second;
    the summary and the sync_state writes (one a write)."""
    settings = with_rupa(settings, page_size=5)
    authorize(engine, settings)
    writes = []

    def count_state_writes(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE SYNC_STATE"):
            writes.append(statement)

    def slow_first_page(rows, total, calls=[]):  # noqa: B006 - a counter on purpose
        calls.append(rows)
        if len(calls) == 1:
            time.sleep(1.0)  # the next pages are fetched meanwhile, up to the read-ahead's bound

    rupa.faults.update(latency=0.05)
    sa.event.listen(engine, "before_cursor_execute", count_state_writes)
    try:
        summary = extract_stream(engine, settings, "patients", progress=slow_first_page)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count_state_writes)
        rupa.faults.reset()
    assert (summary.inserted, summary.pages) == (N_PATIENTS, 10)
    assert _ids(engine, rupa_patients) == set(rupa.patient_ids())
    return summary, writes


def test_pages_that_arrive_while_a_write_runs_are_written_together_in_one_transaction(engine, settings, rupa):
    """The first write is held up (a slow warehouse): the pages fetched meanwhile (four, the
    read-ahead's bound) go in the next write, one transaction with one sync_state update;
    counts, pages and rows are as ever."""
    _, writes = _extract_with_a_slow_first_write(engine, settings, rupa)
    assert len(writes) <= 7  # pages 2-5 shared one write
    state = state_of(engine, "patients")
    assert state["status"] == "succeeded" and state["inserted"] == N_PATIENTS and state["resume_url"] is None


def test_two_pages_are_fetched_ahead_even_when_one_page_fills_a_write(engine, settings, rupa, monkeypatch):
    """Pages as large as a whole write (GROUP_ROWS): still two pages fetched ahead, so a write
    that runs long finds both waiting and takes them together (one page ahead left the fetching
    idle behind a slow warehouse)."""
    from etl.extract import streams as extract

    monkeypatch.setattr(extract, "GROUP_ROWS", 5)
    _, writes = _extract_with_a_slow_first_write(engine, settings, rupa)
    assert len(writes) <= 9  # pages 2 and 3 shared one write (one page ahead: 10 writes)


def test_a_page_of_malformed_resources_is_written_without_them_and_says_how_many_it_skipped(
        engine, settings, rupa, caplog):
    """A vendor page with resources the warehouse cannot key (no id, an empty, boolean or null
    one, one longer than the id column, not an object) and one carrying NUL characters: the run
    succeeds on both warehouses (an over-long id or a NUL used to fail it on PostgreSQL), the
    usable rows are stored (the NUL as U+FFFD), and the skipped ones are counted in the summary
    and a warning, never silently dropped."""
    authorize(engine, settings)
    page = [{"type": "patient", "attributes": {"first_name": "No id"}},
            {"type": "patient", "id": "", "attributes": {}},
            {"type": "patient", "id": True, "attributes": {}},
            {"type": "patient", "id": None, "attributes": {}},
            {"type": "patient", "id": "p" * 101, "attributes": {}},
            "not an object",
            {"type": "patient", "id": "pat_nul", "attributes": {"first_name": "A\x00da", "tags": {"k\x00": "v"}}},
            {"type": "patient", "id": 7, "attributes": {"first_name": "Int"}},
            {"type": "patient", "id": "p" * 100, "attributes": {}}]

    def answer(request):
        if request.method != "GET" or not request.url.path.endswith("/patients"):
            return None
        return Response(json.dumps({"data": page, "links": {"next": None}, "meta": {"total": len(page)}}),
                        media_type="application/vnd.api+json")

    rupa.answer = answer
    with caplog.at_level(logging.WARNING):
        s = extract_stream(engine, settings, "patients")
    assert (s.inserted, s.skipped, s.nul_replaced) == (3, 6, 1)
    assert "3 inserted" in s.line() and "6 skipped (no usable id), 1 with NUL stored as U+FFFD" in s.line()
    assert state_of(engine, "patients")["status"] == "succeeded"
    with engine.connect() as conn:
        rows = {r["id"]: r for r in conn.execute(sa.select(rupa_patients)).mappings()}
    assert sorted(rows) == sorted(["pat_nul", "7", "p" * 100])
    assert rows["pat_nul"]["first_name"] == "A\ufffdda" and rows["pat_nul"]["attributes"]["tags"] == {"k\ufffd": "v"}
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("6 resource(s) on 1 page(s) had no usable id" in m for m in said), said
    assert [m for m in said if "U+0000" in m] == [
        "patients: 1 resource(s) held the character U+0000 (NUL), which PostgreSQL cannot store: "
        "stored as U+FFFD on every warehouse"]  # once a write, a count and never a value


def test_update_disappearance_and_reappearance_are_picked_up(engine, settings, rupa):
    settings = with_rupa(settings, page_size=9)
    authorize(engine, settings)
    extract_stream(engine, settings, "patients")
    extract_stream(engine, settings, "lab_tests")
    with engine.connect() as conn:
        first_seen = conn.execute(sa.select(rupa_patients.c.first_seen_at)
                                  .where(rupa_patients.c.id == "pat_0000010")).scalar_one()

    rupa.update_patient("pat_0000010", last_name="Renamed")
    rupa.delete_patient("pat_0000020")
    rupa.delete_patient("pat_0000049")  # the very last row: paging must still end cleanly
    rupa.update_lab_test("labts_0000001", name="Renamed panel")
    rupa.delete_lab_test("labts_0000005")
    created = httpx.post(f"{settings.rupa.base_url}/patients",
                         headers={"Authorization": f"Bearer {rupa.mint_access_token()}",
                                  "Content-Type": "application/vnd.api+json"},
                         json={"data": {"type": "patient", "attributes": {
                             "first_name": "New", "last_name": "Person", "email": "new@example.test"}}}).json()

    s = extract_stream(engine, settings, "patients")
    labs = extract_stream(engine, settings, "lab_tests")

    assert (s.inserted, s.updated, s.unchanged, s.deleted) == (1, 1, N_PATIENTS - 3, 2)
    assert (labs.updated, labs.deleted) == (1, 1)
    with engine.connect() as conn:
        got = conn.execute(sa.select(rupa_patients).where(rupa_patients.c.id == "pat_0000010")).mappings().one()
        gone = conn.execute(sa.select(rupa_patients.c.deleted_at).where(rupa_patients.c.id == "pat_0000020")).scalar_one()
        lab = conn.execute(sa.select(rupa_lab_tests.c.name).where(rupa_lab_tests.c.id == "labts_0000001")).scalar_one()
    assert got["last_name"] == "Renamed" and got["deleted_at"] is None
    assert got["first_seen_at"] == first_seen  # an update keeps the first sighting
    assert gone is not None  # kept, marked
    assert lab == "Renamed panel"
    assert created["data"]["id"] in _ids(engine, rupa_patients)
    assert count(engine, rupa_patients) == N_PATIENTS + 1
    assert live_count(engine, "patients") == N_PATIENTS - 1

    # a third run: nothing new; the deleted rows stay deleted and are not counted again
    third = extract_stream(engine, settings, "patients")
    assert (third.inserted, third.updated, third.deleted) == (0, 0, 0)
    assert third.unchanged == N_PATIENTS - 1


def test_a_sigkilled_run_leaves_a_consistent_warehouse_and_the_next_run_completes_it(engine, settings, rupa, monkeypatch):
    authorize(engine, settings)
    env = {**os.environ, **cli_env(monkeypatch, settings, page_size=2)}
    rupa.faults.update(latency=0.05)
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "extract", "patients", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            state = state_of(engine, "patients")
            if state and state["inserted"] >= 10:
                break
            assert proc.poll() is None, "the extraction ended before it could be killed"
            assert time.monotonic() < deadline, "the extraction made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    state = state_of(engine, "patients")
    assert state["status"] == "running" and state["resume_url"]
    assert 10 <= state["inserted"] < N_PATIENTS
    assert count(engine, rupa_patients) == state["inserted"]  # rows and bookkeeping agree exactly

    rupa.faults.reset()
    summary = extract_stream(engine, settings, "patients")

    assert summary.resumed
    assert (summary.inserted, summary.updated, summary.deleted) == (N_PATIENTS, 0, 0)
    assert summary.pages == (N_PATIENTS - state["inserted"]) // 2  # only the missing pages
    assert _ids(engine, rupa_patients) == set(rupa.patient_ids())
    first_pages = [r for r in rupa.requests if r.startswith("GET /rupa/patients?") and "after" not in r]
    assert len(first_pages) == 1  # the second run did not start over
    assert state_of(engine, "patients")["status"] == "succeeded"


def test_a_run_that_fails_half_way_is_resumed_and_disappearances_still_count(engine, settings, rupa):
    settings = with_rupa(settings, page_size=5)
    authorize(engine, settings)
    extract_stream(engine, settings, "patients")
    rupa.delete_patient("pat_0000001")  # on a page the interrupted run already read

    class Boom(Exception):
        pass

    def explode_after_three(rows, total, pages=[]):  # noqa: B006 - a counter on purpose
        pages.append(rows)
        if len(pages) == 3:
            raise Boom

    with pytest.raises(Boom):
        extract_stream(engine, settings, "patients", progress=explode_after_three)
    state = state_of(engine, "patients")
    assert state["status"] == "failed" and state["resume_url"]

    rupa.delete_patient("pat_0000045")  # on a page still to come
    done = extract_stream(engine, settings, "patients")
    assert done.resumed and done.deleted == 2
    assert done.unchanged == N_PATIENTS - 2
    assert live_count(engine, "patients") == N_PATIENTS - 2


def test_429_and_5xx_storms_and_dropped_connections_are_survived(engine, settings, rupa):
    settings = replace(with_rupa(settings, page_size=6),
                       retry=RetrySettings(max_attempts=12, initial_wait=0.005, max_wait=0.02, timeout=5.0))
    authorize(engine, settings)
    rupa.faults.update(error_rate=0.25, throttle_rate=0.2, retry_after=0.01, drop_rate=0.1, seed=11)

    s = extract_stream(engine, settings, "patients")
    labs = extract_stream(engine, settings, "lab_tests")

    injected = rupa.faults.injected
    assert injected["errors"] > 0 and injected["throttled"] > 0 and injected["dropped"] > 0
    assert s.inserted == N_PATIENTS and labs.inserted == N_LAB_TESTS
    assert _ids(engine, rupa_patients) == set(rupa.patient_ids())
    again = extract_stream(engine, settings, "patients")
    assert again.unchanged == N_PATIENTS and again.inserted == again.updated == 0


def test_a_scripted_fault_sequence_on_one_page_is_retried_in_order(engine, settings, rupa):
    settings = with_rupa(settings, page_size=25)
    authorize(engine, settings)
    rupa.faults.update(script=[429, 503, "drop", 500, 502], retry_after=0.01)
    s = extract_stream(engine, settings, "patients")
    assert s.inserted == N_PATIENTS and rupa.faults.script == []


def test_an_access_token_expiring_mid_run_is_refreshed_before_expiry(engine, settings, rupa):
    rupa.access_token_ttl = 0.5
    settings = with_rupa(settings, page_size=2)
    authorize(engine, settings)
    rupa.faults.update(latency=0.04)

    s = extract_stream(engine, settings, "patients")

    assert rupa.stats["grant:refresh_token"] >= 1
    assert s.inserted == N_PATIENTS and s.pages == 25
    assert _ids(engine, rupa_patients) == set(rupa.patient_ids())


def test_a_401_mid_run_refreshes_once_and_the_rotated_refresh_token_is_persisted(engine, settings, rupa):
    settings = with_rupa(settings, page_size=5)
    original = authorize(engine, settings)

    def expire_after_two(rows, total, pages=[]):  # noqa: B006
        pages.append(rows)
        if len(pages) == 2:
            rupa.expire_access_tokens()  # server-side: the client still thinks its token is good

    s = extract_stream(engine, settings, "patients", progress=expire_after_two)

    assert rupa.stats["401"] == 1 and rupa.stats["grant:refresh_token"] == 1
    assert s.inserted == N_PATIENTS and s.pages == 10  # the refused page was fetched again, none lost
    stored = TokenStore.for_settings(engine, settings).load()
    assert stored.refresh_token != original.refresh_token  # rotated ...
    assert rupa.refresh_tokens() == {stored.refresh_token}  # ... and the live one is what we kept
    assert stored.access_token != original.access_token

    # the next run (a new process, reading only the warehouse) gets in with the rotated token
    rupa.expire_access_tokens()
    again = extract_stream(engine, settings, "patients")
    assert again.unchanged == N_PATIENTS
    assert rupa.stats["grant:refresh_token"] == 2 and rupa.stats["refresh_refused"] == 0


def test_two_runs_refreshing_at_once_spend_the_refresh_token_only_once(engine, settings, rupa):
    """Patients and lab tests run as parallel Airflow tasks: both see the same expired token."""
    authorize(engine, settings)
    rupa.expire_access_tokens()
    stale = TokenStore.for_settings(engine, settings).load().access_token
    rupa_settings = settings.rupa.validated()
    results, errors = [], []

    def refresh():
        with httpx.Client() as http:
            try:
                results.append(OAuthTokens(rupa_settings, settings.retry, TokenStore.for_settings(engine, settings), http).after_401(stale))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert rupa.stats["grant:refresh_token"] == 1 and rupa.stats["refresh_refused"] == 0
    assert len(set(results)) == 1 and results[0] == TokenStore.for_settings(engine, settings).load().access_token


def test_no_phi_or_tokens_in_any_log_line(engine, settings, rupa, caplog):
    caplog.set_level(logging.DEBUG)
    rupa.access_token_ttl = 0.3
    settings = with_rupa(settings, page_size=10)
    tokens = authorize(engine, settings)
    # faults on the API only: a refresh response dropped after the server rotated the refresh
    # token is unrecoverable by any client (the new token never arrives); see docs/rupa.md
    rupa.faults.update(script=[429, 500, "drop"], retry_after=0.01, latency=0.02,
                       exempt_paths=["/rupa/oauth"])
    extract_stream(engine, settings, "patients")
    rupa.expire_access_tokens()
    extract_stream(engine, settings, "patients")
    rupa.revoke_all()
    rupa.expire_access_tokens()
    with pytest.raises(Exception) as info:
        extract_stream(engine, settings, "patients")

    text = caplog.text + "\n" + str(info.value) + "\n" + str(state_of(engine, "patients")["error"])
    assert "retrying after" in caplog.text and "refreshed the Rupa access token" in caplog.text
    stored = TokenStore.for_settings(engine, settings).load()
    for secret in (tokens.access_token, tokens.refresh_token, stored.access_token, stored.refresh_token,
                   settings.rupa.validated().client_secret):
        assert secret not in text
    for pid in rupa.patient_ids():
        attrs = rupa.patient(pid)["attributes"]
        assert attrs["email"] not in text and attrs["birthday"] not in text
        assert not re.search(rf"\b{attrs['first_name']} {attrs['last_name']}\b", text)
