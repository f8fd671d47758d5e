"""Rupa Checkout, the sending side: an order-intents CSV in, one cart per row at Rupa, a checkout
report out.

    process_intents_file(engine, settings, path)  -> IntentsOutcome   (`labsync intents`, the inbox)
    dry_run(engine, settings, path, out)          -> (would send, already settled, validation)

(The inbox subfolder is etl.checkout.inbox; the report is etl.checkout.report.)

Per valid row (schemas/order_intents.py, validated by the one validator with a warehouse
cross-check; RUPA_CONCURRENCY rows at a time): get or create the patient (`POST /patients`;
Rupa returns the existing patient for the same first name, last name and email), then create
the order intent (`POST /order_intents`), recording every step in the ledger
`rupa_order_intents`, keyed by the row's `row_id`.

Exactly once per row id. Rupa takes no idempotency key, so what a crash can leave unknown is kept
to one request: the row is written `sending` (committed) right before the order-intent request
and `created` with its id and checkout_url right after the answer. A row found `sending` by a
later run went out with no answer recorded (the process died, or the connection broke): it is
sent again, and counted in `resends` and in the report, because that request may have left a
second, unused cart at Rupa (harmless: only the recorded checkout_url is ever shown). Rows
`created` are never sent again; rows claimed by another live run are left to it (`busy`).

The report: FILE.summary.html (per row the patient and a clickable checkout link for the
practitioner, rejected rows with reasons) and FILE.checkout.csv (the links), beside the file.
Names appear in those files, as in the CSV itself; logs carry row ids, batch ids and lines only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from etl.checkout.report import (
    ALREADY,
    BAD_OUTCOMES,
    BUSY,
    CREATED,
    FAILED,
    REJECTED,
    UNKNOWN,
    IntentsOutcome,
    ledger_rows,
    write_report,
)
from etl.claims import Heartbeat, cli_owner
from etl.errors import ApiError, AuthError
from etl.intake import records
from etl.intake.validate import CsvValidation
from etl.logs import counts_text
from etl.returnlink import is_return_link, link_keys, signed_return_url
from etl.rupa.client import RupaApiError, RupaClient, open_client
from etl.settings import Settings
from etl.states import BatchStatus, IntentState
from etl.warehouse import rupa_lab_tests, rupa_order_intents, rupa_patients
from schemas.columns import split_list
from schemas.order_intents import CONTRACT, METADATA_PREFIX, PATIENT_ID

log = logging.getLogger(__name__)

t = rupa_order_intents
LOOKUP_CHUNK = 500



# ---- rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntentRow:
    """One valid CSV row, ready to send. `payload_sha256` covers what Rupa would receive."""

    row_id: str
    line: int | None
    patient_id: str | None
    first_name: str | None
    last_name: str | None
    email: str | None
    birthday: str | None
    lab_test_ids: tuple[str, ...]
    return_url: str
    meta: dict

    @classmethod
    def from_row(cls, row: Mapping) -> IntentRow:
        meta = {k[len(METADATA_PREFIX):]: v for k, v in row.items()
                if k.startswith(METADATA_PREFIX) and v is not None}
        return cls(row_id=row["row_id"], line=row.get("line"), patient_id=row.get(PATIENT_ID),
                   first_name=row.get("first_name"), last_name=row.get("last_name"),
                   email=row.get("email"), birthday=row.get("birthday"),
                   lab_test_ids=tuple(split_list(row.get("lab_test_ids"))),
                   return_url=row["return_url"], meta=meta)

    @property
    def patient_attributes(self) -> dict:
        attrs = {"first_name": self.first_name, "last_name": self.last_name, "email": self.email}
        if self.birthday:
            attrs["birthday"] = self.birthday
        return attrs

    @property
    def payload_sha256(self) -> str:
        who = {"patient_id": self.patient_id} if self.patient_id else self.patient_attributes
        canonical = json.dumps({"patient": who, "lab_tests": list(self.lab_test_ids),
                                "return_url": self.return_url}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def display_name(self) -> str:
        return " ".join(p for p in (self.first_name, self.last_name) if p)


def intent_body(patient_id: str, row: IntentRow) -> dict:
    """The `POST /order_intents` document (what etl.rupa.client sends; used by --dry-run)."""
    return {"data": {
        "type": "order_intent",
        "attributes": {"return_url": row.return_url},
        "relationships": {
            "patient": {"data": {"type": "patient", "id": patient_id}},
            "lab_tests": {"data": [{"type": "lab_test", "id": i} for i in row.lab_test_ids]},
        },
    }}


# ---- the warehouse cross-check (unknown ids are rejected before anything is sent) --------------
def cross_check_for(engine: Engine):
    """The validator's hook: rupa_patient_id and every lab test id must be in the warehouse's
    copy and not marked deleted (`labsync extract` keeps it current)."""

    def known(table, ids: set[str]) -> set[str]:
        found: set[str] = set()
        wanted = sorted(ids)
        with engine.connect() as conn:
            for i in range(0, len(wanted), LOOKUP_CHUNK):
                found.update(conn.execute(sa.select(table.c.id).where(
                    table.c.id.in_(wanted[i:i + LOOKUP_CHUNK]), table.c.deleted_at.is_(None))).scalars())
        return found

    def check(frame) -> list[tuple[int, str, str | None, str]]:
        problems = []
        pids = {v for v in frame[PATIENT_ID].dropna()}
        good_pids = known(rupa_patients, pids) if pids else set()
        tests_by_line = {line: split_list(v) for line, v in frame["lab_test_ids"].dropna().items()}
        all_tests = {i for ids in tests_by_line.values() for i in ids}
        good_tests = known(rupa_lab_tests, all_tests) if all_tests else set()
        for line, pid in frame[PATIENT_ID].dropna().items():
            if pid not in good_pids:
                problems.append((line, PATIENT_ID, pid,
                                 f"rupa_patient_id {pid!r} is not among the Rupa patients in the warehouse; "
                                 "check the id or run `labsync extract patients`"))
        for line, ids in tests_by_line.items():
            unknown = [i for i in ids if i not in good_tests]
            if unknown:
                problems.append((line, "lab_test_ids", frame.at[line, "lab_test_ids"],
                                 f"lab test {', '.join(repr(u) for u in unknown[:5])} is not among the Rupa "
                                 "lab tests in the warehouse; check the id or run `labsync extract lab-tests`"))
        return problems

    return check


def open_validation(engine: Engine, path: Path | str, *, record: bool = True):
    """(batch id or None, CsvValidation) for an intents file; UnusableInputError if unusable."""
    kw = dict(contract=CONTRACT, cross_check=cross_check_for(engine))
    if record:
        return records.open_batch(engine, path, **kw)
    return None, CsvValidation(path, **kw)


# ---- the ledger ---------------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC)


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _insert(conn):
    return postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)


@dataclass(frozen=True)
class Claim:
    send: bool
    outcome: str | None = None  # when not sending: ALREADY / REJECTED / BUSY
    resend: bool = False  # sending again after an unknown outcome
    patient_id: str | None = None  # found by an earlier run (the patient step is done)
    note: str | None = None


def claim(engine: Engine, row: IntentRow, *, run: str, batch_id: int | None, lease: timedelta,
          now: datetime | None = None) -> Claim:
    """Write the row `pending` (new) or take it over; decide whether this run sends it. One
    transaction; the conditional UPDATE makes two racing runs agree on one sender. `run` is the
    claim's owner (etl.claims: a task instance or a CLI run); a claim is live while its lease
    holds (the sender's heartbeat renews it), and a lapsed one is taken over by anyone."""
    now = now or _now()
    until = now + lease
    sha = row.payload_sha256
    with engine.begin() as conn:
        conn.execute(_insert(conn).on_conflict_do_nothing(index_elements=["row_id"]), [dict(
            row_id=row.row_id, batch_id=batch_id, line=row.line, state=IntentState.PENDING,
            patient_id=row.patient_id, lab_test_ids=list(row.lab_test_ids), return_url=row.return_url,
            meta=row.meta or None, attempts=0, resends=0, payload_sha256=sha, claimed_by=run,
            claimed_until=until, created_at=now, updated_at=now)])
        cur = conn.execute(sa.select(t).where(t.c.row_id == row.row_id)).mappings().one()
        if cur["claimed_by"] == run and cur["state"] == IntentState.PENDING:
            return Claim(True)  # inserted just now by this run (or by this task instance's last try)
        if cur["state"] == IntentState.CREATED:
            note = None if cur["payload_sha256"] == sha else (
                f"row_id {row.row_id!r} already has a cart (batch {cur['batch_id']}, line {cur['line']}) "
                "made from different content; this row was not sent: use a new row_id for a new cart")
            return Claim(False, ALREADY, note=note)
        if cur["state"] == IntentState.REJECTED and cur["payload_sha256"] == sha:
            return Claim(False, REJECTED, note=cur["last_error"])
        claimable = (cur["claimed_by"] is None or cur["claimed_by"] == run
                     or (_aware(cur["claimed_until"]) or now) < now)
        if not claimable:
            return Claim(False, BUSY, note="being sent by another run")
        resend = cur["state"] == IntentState.SENDING
        guard = t.c.claimed_by.is_(None) if cur["claimed_by"] is None else t.c.claimed_by == cur["claimed_by"]
        same_patient = cur["payload_sha256"] == sha and cur["patient_id"]
        done = conn.execute(
            sa.update(t).where(t.c.row_id == row.row_id, t.c.state == cur["state"], guard)
            .values(state=IntentState.PENDING if not resend else IntentState.SENDING,
                    claimed_by=run, claimed_until=until, batch_id=batch_id, line=row.line,
                    payload_sha256=sha, lab_test_ids=list(row.lab_test_ids), return_url=row.return_url,
                    meta=row.meta or None, patient_id=cur["patient_id"] if same_patient else row.patient_id,
                    updated_at=now)).rowcount
        if not done:
            return Claim(False, BUSY, note="being sent by another run")
        return Claim(True, resend=resend, patient_id=cur["patient_id"] if same_patient else None)


def _update(engine: Engine, row_id: str, run: str, **values) -> int:
    values.setdefault("updated_at", _now())
    with engine.begin() as conn:
        return conn.execute(sa.update(t).where(t.c.row_id == row_id, t.c.claimed_by == run)
                            .values(**values)).rowcount


def _release(engine: Engine, row_id: str, run: str, state: str, error: str | None, **values) -> None:
    _update(engine, row_id, run, state=state, last_error=error, claimed_by=None, claimed_until=None, **values)


# ---- sending ------------------------------------------------------------------------------------
@dataclass
class SendSummary:
    counts: Counter = field(default_factory=Counter)  # one per row read, by outcome
    resent: int = 0  # rows sent again after an unknown outcome
    requests: int = 0
    stopped: str | None = None

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return 2
        return 1 if any(self.counts.get(k) for k in BAD_OUTCOMES) else 0


def send_rows(engine: Engine, client: RupaClient, rows: Iterable[Mapping], *, batch_id: int | None,
              lease: timedelta, run: str | None = None, summary_: SendSummary | None = None,
              concurrency: int = 1, return_keys: Callable[[], list[bytes]] | None = None) -> SendSummary:
    """Get or create each row's patient and create its order intent; every step in the ledger.
    Up to `concurrency` rows are in flight at once (threads sharing the client). A refused token
    (AuthError) stops the run: rows in hand are marked `failed`, no further row is claimed, the
    rest are left for the next run, and the error is re-raised. `return_keys`: the return-link
    signing keys (etl.returnlink), asked for when a row's return_url is labsync's return page."""
    run = run or cli_owner()
    out = summary_ or SendSummary()
    start = client.requests
    lock = threading.Lock()
    stop = threading.Event()

    def one(raw: Mapping) -> None:
        if stop.is_set():
            return
        row = IntentRow.from_row(raw)
        decision = claim(engine, row, run=run, batch_id=batch_id, lease=lease)
        if not decision.send:
            with lock:
                out.counts[decision.outcome] += 1
            return
        if decision.resend:
            with lock:
                out.resent += 1
            log.warning("intents: batch %s row %s (line %s) went out earlier with no answer recorded; "
                        "sending it again (Rupa may hold a second, unused cart)", batch_id, row.row_id, row.line)
        try:
            result = _send_one(engine, client, row, run, decision, batch_id, return_keys)
        except AuthError:
            stop.set()
            raise
        with lock:
            out.counts[result] += 1

    try:
        if concurrency <= 1:
            for raw in rows:
                one(raw)
        else:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rupa-intents") as pool:
                for future in [pool.submit(one, raw) for raw in rows]:
                    future.result()
    except AuthError as exc:
        out.stopped = str(exc)
        raise
    finally:
        out.requests += client.requests - start
    return out


def _refused(exc: ApiError) -> bool:
    """Rupa answered and said no (a 4xx other than 401): nothing was created."""
    return isinstance(exc, RupaApiError) and exc.status is not None and 400 <= exc.status < 500 and exc.status != 401


def _return_url(row: IntentRow, return_keys: Callable[[], list[bytes]] | None) -> str:
    """The return_url given to Rupa: a return link to labsync's return page (`?row_id=<this
    row>`) signed (etl.returnlink: `&sig=`), any other as the file gives it."""
    if return_keys is None or not is_return_link(row.return_url, row.row_id):
        return row.return_url
    return signed_return_url(row.return_url, row.row_id, return_keys())


def _send_one(engine: Engine, client: RupaClient, row: IntentRow, run: str, decision: Claim,
              batch_id: int | None, return_keys: Callable[[], list[bytes]] | None = None) -> str:
    patient_id = row.patient_id or decision.patient_id
    return_url = _return_url(row, return_keys)  # a missing key (ConfigError) stops before anything is sent
    if not decision.resend:
        # the patient step: Rupa de-duplicates on name + email, so repeating it is safe
        if patient_id is None:
            try:
                patient = client.create_patient(**row.patient_attributes)
            except AuthError:
                _release(engine, row.row_id, run, IntentState.FAILED, "not sent: Rupa refused the credentials")
                raise
            except ApiError as exc:  # refused (4xx): rejected; no answer: failed, sent next run
                state = IntentState.REJECTED if _refused(exc) else IntentState.FAILED
                _release(engine, row.row_id, run, state, f"patient: {exc}")
                return REJECTED if _refused(exc) else FAILED
            patient_id = str(patient["id"])
        # committed before the request: a crash from here on leaves `sending`
        _update(engine, row.row_id, run, state=IntentState.SENDING, patient_id=patient_id,
                attempts=t.c.attempts + 1, last_error=None)
    else:
        _update(engine, row.row_id, run, resends=t.c.resends + 1, attempts=t.c.attempts + 1)
        if patient_id is None:  # left `sending` with no patient recorded cannot happen; be safe
            _release(engine, row.row_id, run, IntentState.FAILED, "no patient recorded; sent again next run")
            return FAILED
    try:
        intent = client.create_order_intent(patient_id, return_url=return_url,
                                            lab_test_ids=row.lab_test_ids)
    except AuthError:  # a 401 is an answer: nothing was created
        _release(engine, row.row_id, run, IntentState.FAILED, "not sent: Rupa refused the credentials")
        raise
    except ApiError as exc:
        if _refused(exc):
            _release(engine, row.row_id, run, IntentState.REJECTED, str(exc))
            log.info("intents: batch %s row %s (line %s) rejected by Rupa: %s", batch_id, row.row_id, row.line, exc)
            return REJECTED
        # no usable answer (a lost connection, a 5xx): the cart may or may not exist
        _release(engine, row.row_id, run, IntentState.SENDING, f"{exc}; the outcome is unknown, sent again next run")
        log.warning("intents: batch %s row %s (line %s): no answer from Rupa; sent again next run",
                    batch_id, row.row_id, row.line)
        return UNKNOWN
    _release(engine, row.row_id, run, IntentState.CREATED, None, order_intent_id=intent.id,
             checkout_url=intent.checkout_url)
    log.info("intents: batch %s row %s (line %s) -> order intent %s", batch_id, row.row_id, row.line, intent.id)
    return CREATED


# ---- one file -----------------------------------------------------------------------------------
def process_intents_file(engine: Engine, settings: Settings, path: Path | str, *,
                         client: RupaClient | None = None, owner: str | None = None) -> IntentsOutcome:
    """Validate an intents file, send its valid rows, write its report beside it. An unusable
    file raises UnusableInputError (recorded `unusable` in batch_files; nothing sent). `owner`
    holds the rows' claims (etl.claims; a new CLI run when None), kept alive by a heartbeat."""
    path = Path(path)
    owner = owner or cli_owner()
    lease = timedelta(seconds=settings.lease_seconds)
    batch_id, validation = open_validation(engine, path)
    own = client is None
    if client is None:
        client = open_client(settings, engine)
    sent = SendSummary()
    return_keys = cache(lambda: link_keys(settings.fernet_key, engine))
    seen: list[tuple[int | None, str]] = []
    names: dict[str, str] = {}
    try:
        with Heartbeat(engine, [owner], lease=lease, interval=settings.heartbeat_seconds):
            for chunk in validation.chunks():
                for r in chunk:
                    seen.append((r.get("line"), r["row_id"]))
                    names[r["row_id"]] = " ".join(p for p in (r.get("first_name"), r.get("last_name")) if p)
                send_rows(engine, client, chunk, batch_id=batch_id, summary_=sent, run=owner, lease=lease,
                          concurrency=settings.rupa.concurrency, return_keys=return_keys)
    except AuthError:
        records.set_status(engine, batch_id, BatchStatus.INCOMPLETE, error="stopped: Rupa refused the credentials")
        raise
    finally:
        if own:
            client.close()
    result = records.close_batch(engine, batch_id, validation)
    incomplete = any(sent.counts.get(k) for k in (FAILED, UNKNOWN, BUSY))
    status = BatchStatus.INCOMPLETE if incomplete else BatchStatus.LOADED
    records.set_status(engine, batch_id, status)
    outcome = IntentsOutcome(name=path.name, batch_id=batch_id, status=status, total_rows=result.total_rows,
                             valid_rows=result.valid_rows, rejected_rows=result.rejected_rows,
                             counts=dict(sent.counts), resent=sent.resent,
                             rejects_path=str(result.rejects_path) if result.rejects_path else None)
    write_report(engine, path, outcome, seen, names)
    log.info("intents: batch %s %s: %s", batch_id, status, counts_text(sent.counts))
    return outcome


# ---- dry run ------------------------------------------------------------------------------------
def dry_run(engine: Engine, settings: Settings, path: Path | str, out) -> tuple[int, int, CsvValidation]:
    """Validate, then write the requests a run would send as JSON lines (no tokens, nothing
    sent, nothing recorded). Rows the ledger has settled are left out."""
    base = settings.rupa.base_url.rstrip("/")
    _, validation = open_validation(engine, path, record=False)
    would = settled = 0
    for chunk in validation.chunks():
        rows = [IntentRow.from_row(r) for r in chunk]
        ledger = ledger_rows(engine, [r.row_id for r in rows])
        for row in rows:
            cur = ledger.get(row.row_id)
            if cur and (cur["state"] == IntentState.CREATED or (
                    cur["state"] == IntentState.REJECTED and cur["payload_sha256"] == row.payload_sha256)):
                settled += 1
                continue
            would += 1
            headers = {"Authorization": "Bearer ***", "Content-Type": "application/vnd.api+json"}
            pid = row.patient_id or (cur or {}).get("patient_id")
            if pid is None:
                out.write(json.dumps({"line": row.line, "row_id": row.row_id, "method": "POST",
                                      "url": f"{base}/patients", "headers": headers,
                                      "body": {"data": {"type": "patient", "attributes": row.patient_attributes}}},
                                     ensure_ascii=False) + "\n")
            out.write(json.dumps({"line": row.line, "row_id": row.row_id, "method": "POST",
                                  "url": f"{base}/order_intents", "headers": headers,
                                  "body": intent_body(pid or "<the id POST /patients returns>", row)},
                                 ensure_ascii=False) + "\n")
    return would, settled, validation
