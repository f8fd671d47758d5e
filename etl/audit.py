"""The audit trail: who saw or wrote PHI, when, what, about which subjects (ids only), how many.

    audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", ["ORD-1"], 1)
    audit.query(engine, since=..., who="alice", order="ORD-1")

One table, `phi_access`, and this is its only writer: rows are appended, never updated, and
deleted only by the trail's own retention (`purge_expired`, LABSYNC_RETENTION_AUDIT_DAYS, default
6 years). A row names its subjects by id (clientOrderIds, batch ids, Rupa ids, event ids), never
by a name, a date of birth or a value.

Who (`actor`):
- the CLI: `cli:<OS user>` (getpass.getuser());
- an Airflow task: `airflow:<dag_id>.<task_id>.<run_id>.<try>` (set by etl.airflow.tasks from the
  running task's context: `set_process_actor`);
- the webhook receiver: `receiver:<remote address>` (`record_receipt`).
`acting_as(name)` sets it for a block (a contextvar), e.g. in tests or a server's request.

The record is written before the PHI is shown: a trail that cannot be written stops the command.
"""

from __future__ import annotations

import contextlib
import contextvars
import getpass
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from etl.states import AuditAction
from etl.warehouse.tables import phi_access

MAX_IDS = 1000  # subject ids kept per row (the count says how many there were)
MAX_ID_CHARS = 200

_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("labsync_audit_actor", default=None)
_process_actor: str | None = None


# ---- who -----------------------------------------------------------------------------------------

def cli_actor() -> str:
    """`cli:<the OS user>` (`uid:<n>` where the user has no name, as in some containers)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER
        user = f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"cli:{user}"


def airflow_actor(dag_id: str, task_id: str, run_id: str, try_number: int | None, map_index: int | None = -1) -> str:
    """`airflow:<dag_id>.<task_id>[<map_index>].<run_id>.<try>`: one task instance's try."""
    task = task_id if map_index is None or map_index < 0 else f"{task_id}[{map_index}]"
    return f"airflow:{dag_id}.{task}.{run_id}.{try_number if try_number is not None else 0}"[:300]


def receiver_actor(remote: str | None) -> str:
    return f"receiver:{remote or 'unknown'}"[:300]


def set_process_actor(name: str | None) -> None:
    """Who acts for the rest of this process (etl.airflow.tasks sets the task instance)."""
    global _process_actor
    _process_actor = name


@contextlib.contextmanager
def acting_as(name: str) -> Iterator[None]:
    token = _actor.set(name)
    try:
        yield
    finally:
        _actor.reset(token)


def actor() -> str:
    """Who is acting now: a block's `acting_as`, else the process's (Airflow), else the OS user."""
    return _actor.get() or _process_actor or cli_actor()


# ---- writing -------------------------------------------------------------------------------------

def _ids(subject_ids: Iterable[object]) -> list[str]:
    seen: dict[str, None] = {}
    for i in subject_ids:
        if i is None:
            continue
        seen.setdefault(str(i)[:MAX_ID_CHARS], None)
        if len(seen) >= MAX_IDS:
            break
    return list(seen)


def record(db: Engine | Connection, action: AuditAction | str, subject_kind: str,
           subject_ids: Iterable[object] = (), count: int | None = None, *, detail: str | None = None,
           who: str | None = None, at: datetime | None = None) -> int:
    """Append one row; returns its id. `count`: records shown / written / purged (default: the
    number of distinct ids). `detail`: a PHI-free note (a file's place in the inbox)."""
    ids = list(subject_ids)
    kept = _ids(ids)
    row = dict(at=at or datetime.now(UTC), actor=(who or actor())[:300], action=str(AuditAction(action)),
               subject_kind=subject_kind[:40], subject_ids=kept,
               record_count=int(count if count is not None else len({str(i) for i in ids if i is not None})),
               detail=detail[:500] if detail else None)
    if isinstance(db, Connection):
        return int(db.execute(sa.insert(phi_access).values(**row).returning(phi_access.c.id)).scalar_one())
    with db.begin() as conn:
        return int(conn.execute(sa.insert(phi_access).values(**row).returning(phi_access.c.id)).scalar_one())


def record_receipt(engine: Engine, remote: str | None, source: str, event_id: int) -> int:
    """The webhook receiver stored a delivery (its body may hold PHI): who sent it (the remote
    address), which source (lgc, rupa) and the stored event's id."""
    return record(engine, AuditAction.WEBHOOK_RECEIVED, "webhook_event", [event_id], 1, detail=source,
                  who=receiver_actor(remote))


def record_files(engine: Engine, names: Sequence[str], *, subject_kind: str = "batch",
                 subject_ids: Iterable[object] = (), count: int | None = None,
                 action: AuditAction = AuditAction.REPORT_WRITTEN) -> int | None:
    """Files holding PHI were written (reports beside a batch, a dry run's bodies): one row,
    the files' names as its detail. Nothing when no file was written."""
    if not names:
        return None
    return record(engine, action, subject_kind, subject_ids, count if count is not None else len(names),
                  detail=", ".join(names))


def purge_expired(conn: Connection, cutoff: datetime, *, dry_run: bool = False) -> list[int]:
    """The trail's own retention: rows older than `cutoff` (ids; deleted unless `dry_run`)."""
    ids = [int(i) for i in conn.execute(sa.select(phi_access.c.id).where(phi_access.c.at < cutoff)
                                        .order_by(phi_access.c.id)).scalars()]
    if ids and not dry_run:
        conn.execute(sa.delete(phi_access).where(phi_access.c.at < cutoff))
    return ids


# ---- reading -------------------------------------------------------------------------------------

def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def query(engine: Engine, *, since: datetime | None = None, who: str | None = None, order: str | None = None,
          action: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of the trail, oldest first. `who`: part of the actor (`alice`, `airflow:labsync_retention`);
    `order`: a subject id (a clientOrderId, a batch id) the row names; `since`: at or after."""
    t = phi_access
    q = sa.select(t).order_by(t.c.at, t.c.id)
    if since is not None:
        q = q.where(t.c.at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
    if who:
        q = q.where(t.c.actor.like(_like(who), escape="\\"))
    if action:
        q = q.where(t.c.action == action)
    if order:  # narrowed in SQL on the ids' JSON text, then matched exactly
        q = q.where(sa.cast(t.c.subject_ids, sa.Text).like(_like(json.dumps(order)), escape="\\"))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    if order:
        rows = [r for r in rows if order in (r["subject_ids"] or [])]
    if limit:
        rows = rows[-limit:]
    return rows


def stored_result_subjects(engine: Engine, since: datetime) -> tuple[list[str], int]:
    """The orders whose result documents were stored at or after `since` (LetsGetChecked
    clientOrderIds, Rupa order ids) and how many documents: what a results run audits."""
    from etl.warehouse.tables import lgc_results, rupa_results

    with engine.connect() as conn:
        lgc = conn.execute(sa.select(lgc_results.c.client_order_id).where(
            sa.or_(lgc_results.c.fetched_at >= since, lgc_results.c.hl7_fetched_at >= since))).scalars().all()
        rupa = conn.execute(sa.select(rupa_results.c.order_id).where(rupa_results.c.stored_at >= since)).scalars().all()
    return [*lgc, *rupa], len(lgc) + len(rupa)


def record_results(engine: Engine, since: datetime) -> int | None:
    """Audit the result documents a run stored since `since` (nothing when there were none)."""
    ids, n = stored_result_subjects(engine, since)
    if not n:
        return None
    return record(engine, AuditAction.RESULTS_STORED, "order", ids, n)


def record_reports(engine: Engine, batch_file, *, batch_id: int | None = None, count: int | None = None) -> int | None:
    """Audit the reject and fix reports (they hold the rejected cells) written beside a local
    batch file by `labsync validate --record` / `labsync load` (nothing when none was written)."""
    from pathlib import Path

    from etl.intake.names import fix_path_for, rejects_path_for

    path = Path(batch_file)
    names = [p.name for p in (rejects_path_for(path), fix_path_for(path)) if p.is_file()]
    return record_files(engine, names, subject_ids=[batch_id] if batch_id is not None else [], count=count)


def record_outcome_reports(engine: Engine, outcome: dict) -> int | None:
    """Audit the reports an order-intents run wrote (its rejects, its summary page and checkout
    file name patients and their links): `outcome` is etl.checkout.report.IntentsOutcome's dict."""
    import posixpath

    names = [posixpath.basename(str(outcome[k])) for k in ("rejects_path", "summary_path", "checkout_path")
             if outcome.get(k)]
    batch = outcome.get("batch_id")
    return record_files(engine, names, subject_ids=[batch] if batch is not None else [],
                        count=int(outcome.get("total_rows") or 0))
