"""LetsGetChecked commands: `labsync load FILE.csv [--dry-run]`, `labsync retry`, `labsync status`.

`load` validates the WHOLE file first (reject report beside it, as `labsync validate` does),
writing each valid row's PUT body to the warehouse's outbox as it goes, and sends only once the
file proved usable to its last line: a file unusable anywhere sends nothing. Then it loads the
batch from the outbox, as the DAG's load tasks do. `retry` sends again, from the outbox, the rows
of earlier batches that did not go through. Exit codes: 0 every row accepted (or conflict, or
settled by an earlier batch), 1 some rows rejected/failed/busy, 2 unusable input or
configuration (including credentials refused by LetsGetChecked, or the warehouse going away),
130 interrupted (claimed rows released with that reason).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from etl.settings import Settings


STATE_ORDER = ("accepted", "already_settled", "conflict", "rejected", "failed", "unconfirmed", "pending",
               "queued", "given_up", "busy", "duplicate")


def _counts_text(counts: dict) -> str:
    keys = [k for k in STATE_ORDER if k in counts] + sorted(k for k in counts if k not in STATE_ORDER)
    return ", ".join(f"{k} {counts[k]}" for k in keys) or "no rows"


def _rough_rows(path: Path) -> int | None:
    """Data lines in the file (an upper bound on rows): the progress bar's total."""
    try:
        with path.open("rb") as f:
            return max(0, sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b"")) - 1)
    except OSError:
        return None


def register(app: typer.Typer) -> None:
    @app.command()
    def load(
        file: Path = typer.Argument(..., help="The order batch CSV."),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Validate and write the exact requests (tokens masked); send nothing."
        ),
        requests_file: Path | None = typer.Option(
            None, "--requests", help="--dry-run: where to write the requests as JSON lines "
            "(default FILE.requests.jsonl; '-' for standard output)."
        ),
    ) -> None:
        """Validate FILE.csv and load its valid rows into LetsGetChecked, one order per row."""
        from etl import warehouse
        from etl.settings import Settings

        settings = Settings.from_env().checked()
        lgc = settings.lgc.validated()  # ConfigError (exit 2) before the file is touched
        engine = warehouse.connect(settings.warehouse_url)
        if dry_run:
            raise typer.Exit(_dry_run(engine, settings, lgc, file, requests_file))
        raise typer.Exit(_load(engine, settings, file))

    @app.command()
    def retry(
        given_up: bool = typer.Option(
            False, "--given-up", help="Also send rows that were given up (a person fixed the cause)."),
    ) -> None:
        """Send again the rows of earlier batches that did not go through (from the outbox).

        What each order_batches run does by itself: rows `failed`, or `pending` whose loader
        died, go out again up to LABSYNC_MAX_ATTEMPTS loads each; then they are `given_up` and
        need a person (`--given-up` gives them a fresh budget). A batch whose last row settles
        becomes `loaded` and its summary is written again. Exit 0 when nothing is left to send,
        1 when rows are still not settled."""
        raise typer.Exit(_retry(given_up))

    @app.command()
    def status(
        client_order_id: str | None = typer.Argument(None, help="One clientOrderId to show."),
        batch: str | None = typer.Option(None, "--batch", help="A batch's file name (or id)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        limit: int = typer.Option(50, help="At most this many rows in a table (0 = all)."),
    ) -> None:
        """Show what happened to orders: per clientOrderId, per batch, or counts for the ledger."""
        from rich.console import Console
        from rich.table import Table

        from etl import warehouse
        from etl.commands import jsonout
        from etl.orders import ledger, lifecycle, outbox
        from etl.settings import Settings

        settings = Settings.from_env()
        engine = warehouse.connect(settings.warehouse_url)
        batch_ids = None
        if batch is not None:
            batch_ids = ledger.find_batch_ids(engine, batch)
            if not batch_ids:
                typer.echo(f"labsync: no batch named {batch!r} in the warehouse", err=True)
                raise typer.Exit(1)
        if client_order_id is None and batch is None:
            counts = ledger.state_counts(engine)
            waiting = outbox.given_up(engine)
            items = lifecycle.status_counts(engine)
            if as_json:
                typer.echo(jsonout.dumps({"counts": counts, "given_up": waiting, "items": items}, indent=None))
            else:
                typer.echo(f"ledger: {_counts_text(counts)}")
                if items:
                    typer.echo("items: " + ", ".join(f"{k} {v}" for k, v in sorted(items.items())))
                if waiting:
                    typer.echo(f"needs a person: {waiting} rows given up after {settings.max_attempts} "
                               "attempts (labsync status --batch NAME shows them; fix the cause, then "
                               "labsync retry --given-up)")
            raise typer.Exit(0)
        from etl.redact import clean

        if batch_ids is not None and client_order_id is None:  # this batch's own rows, from the outbox
            rows = [r for b in batch_ids for r in outbox.rows_of(engine, b)]
            for r in rows:
                r.pop("id", None)
        else:
            rows = ledger.status_rows(engine, client_order_id=client_order_id, batch_ids=batch_ids)
        for r in rows:  # stored clean; cleaned again for rows an older labsync stored
            r["last_error"] = clean(r.get("last_error"))
        if not rows:
            what = f"{client_order_id!r} is not in the ledger" if client_order_id else f"batch {batch!r} has no rows to send"
            typer.echo(f"labsync: {what}", err=True)
            raise typer.Exit(1)
        statuses = lifecycle.item_statuses(engine, [r["client_order_id"] for r in rows])
        for r in rows:  # each order's items at LetsGetChecked (from `labsync track`)
            r["items"] = statuses.get(r["client_order_id"], [])
        from etl.orders import outreach

        letters = outreach.letters_of(engine, [r["client_order_id"] for r in rows])
        for r in rows:  # when the patient's and the PCP's results letters went out (issue 25)
            r["letters"] = letters.get(r["client_order_id"], {"patient": None, "pcp": None})
        from etl import audit
        from etl.states import AuditAction

        if client_order_id is not None:  # recorded before anything is shown (etl.audit)
            audit.record(engine, AuditAction.ORDER_STATUS_SHOWN, "order", [client_order_id], 1)
        else:
            audit.record(engine, AuditAction.BATCH_STATUS_SHOWN, "order", [r["client_order_id"] for r in rows],
                         len(rows), detail="batch " + ", ".join(str(b) for b in batch_ids or []))
        if as_json:
            out = rows[0] if client_order_id is not None else rows
            typer.echo(jsonout.dumps(out))
            raise typer.Exit(0)
        by_state: dict[str, int] = {}
        for r in rows:
            by_state[r["state"]] = by_state.get(r["state"], 0) + 1
        shown = rows if not limit else rows[:limit]
        table = Table("clientOrderId", "batch", "line", "state", "HTTP", "attempts",
                      "order items", "item statuses", "results letters", "last error", "updated")
        for r in shown:
            item_ids = ", ".join(f"{i.get('code')}={i.get('id')}" for i in (r["order_item_ids"] or []))
            table.add_row(r["client_order_id"], str(r["batch"] or ""), str(r["line"] or ""),
                          r["state"], str(r["http_status"] or ""), str(r["attempts"]), item_ids,
                          lifecycle.describe_items(r["items"]), outreach.describe(r["letters"]), r["last_error"] or "",
                          jsonout.iso(r["updated_at"]))
        console = Console(width=max(Console().width, 160))
        console.print(table)
        if len(shown) < len(rows):
            console.print(f"... {len(rows) - len(shown)} more (use --limit 0 or --json)")
        console.print(f"{len(rows)} orders: {_counts_text(by_state)}")
        raise typer.Exit(0)


def _load(engine, settings: Settings, file: Path) -> int:
    """Claim the file's batch, stage it whole into the outbox (unless a run before did), load
    it, finish it. The claim keeps two runs from staging the same file; the ledger keeps rows
    from going out twice."""
    from etl.claims import Heartbeat, cli_owner
    from etl.commands import progress as bars
    from etl.errors import Interrupted, UnusableInputError
    from etl.intake import records
    from etl.intake.validate import CsvValidation
    from etl.orders import outbox, staging
    from etl.orders.load import LoadSummary, load_chunk
    from etl.states import BatchStatus

    owner = cli_owner()
    try:
        sha = staging.sha256_of(file)
    except OSError:
        CsvValidation(file)  # raises the plain UnusableInputError (no such file, a directory, ...)
        raise
    taken = staging.take(engine, settings, file.name, sha, owner=owner)
    if taken is None:
        typer.echo(f"labsync: {file.name} is being processed by another run right now; run this again "
                   f"when it is done (within {settings.lease_seconds:.0f}s if that run died)", err=True)
        return 1
    batch_id = taken.batch_id
    summary = LoadSummary()
    finished = False
    heartbeat = Heartbeat(engine, [owner], lease=staging.lease(settings), interval=settings.heartbeat_seconds)
    try:
        heartbeat.start()  # the file's claim stays ours while a big file is validated
        if taken.status == BatchStatus.UNUSABLE:
            raise UnusableInputError(taken.row["error"] or f"{file.name}: the file cannot be used")
        if staging.needs_validation(engine, taken):
            staged = staging.stage(engine, settings, taken, file, owner=owner)
            if staged.status == BatchStatus.UNUSABLE:
                raise UnusableInputError(staged.error or f"{file.name}: the file cannot be used")
            from etl import audit

            audit.record_reports(engine, file, batch_id=batch_id, count=staged.rejected_rows)
            typer.echo(staged.summary)
        else:
            if outbox.reset_given_up(engine, [batch_id]) or taken.status != BatchStatus.VALIDATED:
                records.reopen(engine, batch_id, fence=records.fence(batch_id, owner=owner,
                                                                     lease=staging.lease(settings)))
            row = taken.row
            typer.echo(f"{file.name}: {row['total_rows']} rows, {row['valid_rows']} valid, "
                       f"{row['rejected_rows']} rejected (checked before, batch {batch_id})")
        chunks = outbox.chunks(engine, [batch_id], 1 << 62, max_attempts=settings.max_attempts)
        with bars.bar("orders") as bar:
            task = bar.add_task(f"loading {file.name}", total=sum(c.rows for c in chunks), note="")
            seen: dict[str, int] = {}

            def progress(result) -> None:
                seen[result.state] = seen.get(result.state, 0) + 1
                bar.update(task, advance=1, note=_counts_text(seen))

            for chunk in chunks:
                summary = summary.merge(load_chunk(engine, settings, chunk, owner=owner, progress=progress))
        staging.finish(engine, settings, batch_id, owner=owner)
        finished = True
    except KeyboardInterrupt:
        _finish_quietly(engine, settings, batch_id, owner)
        left = outbox.unsettled(outbox.counts(engine, [batch_id])[batch_id])
        raise Interrupted(f"interrupted: {left} rows of {file.name} were not sent (or their answer was "
                          "not recorded); they go out on the next run (labsync retry, or load the file "
                          "again)") from None
    finally:
        heartbeat.stop()
        if finished:
            records.release_batch(engine, batch_id, owner=owner)
        else:  # on the way out with an error: record what we can, never mask that error
            _finish_quietly(engine, settings, batch_id, owner)
            with contextlib.suppress(Exception):
                records.release_batch(engine, batch_id, owner=owner)
    counts = {k: v for k, v in outbox.counts(engine, [batch_id])[batch_id].items() if v}
    if summary.stopped:
        typer.echo(f"labsync: the batch stopped early: {summary.stopped}", err=True)
    typer.echo(
        f"LetsGetChecked: {_counts_text(counts)} (sent {summary.sent} now, already settled "
        f"{summary.skipped}, {summary.elapsed:.1f}s)"
    )
    if counts.get("busy") or summary.counts.get("busy"):
        typer.echo(f"labsync: {summary.counts['busy']} rows are being sent by another run", err=True)
    typer.echo(f"details: labsync status --batch {file.name}")
    if summary.credentials_refused:
        return 2
    ok = all(k in ("accepted", "conflict", "already_settled") for k in counts)
    rejected = records.get(engine, batch_id)["rejected_rows"]
    return 0 if ok and not rejected and not summary.counts.get("busy") else 1


def _finish_quietly(engine, settings: Settings, batch_id: int, owner: str) -> None:
    """Record the batch's true status before giving it up (it may be `incomplete`: `labsync
    retry` and later runs send the rest); never hide the error that got us here."""
    from etl.orders import staging

    with contextlib.suppress(Exception):
        staging.finish(engine, settings, batch_id, owner=owner)


def _retry(include_given_up: bool) -> int:
    from etl import warehouse
    from etl.claims import cli_owner
    from etl.errors import Interrupted, LabsyncError
    from etl.orders import inbox, outbox
    from etl.orders.load import LoadSummary, load_chunk
    from etl.settings import Settings

    settings = Settings.from_env().checked()
    settings.lgc.validated()
    engine = warehouse.connect(settings.warehouse_url)
    owner = cli_owner()
    batches = inbox.retry_batches(engine, settings, owner=owner, given_up=include_given_up)
    names = {b["batch_id"]: b["name"] for b in batches}
    chunks = outbox.chunks(engine, list(names), settings.chunk_rows, max_attempts=settings.max_attempts, names=names)
    summary, error = LoadSummary(), None
    try:
        for chunk in chunks:
            try:
                summary = summary.merge(load_chunk(engine, settings, chunk, owner=owner))
            except LabsyncError as exc:
                error = exc
                break
    except KeyboardInterrupt:
        inbox.finish(engine, settings, {"batches": [], "retried": batches}, owner=owner)
        raise Interrupted("interrupted; the rows not sent go out on the next run") from None
    outcomes = inbox.finish(engine, settings, {"batches": [], "retried": batches}, owner=owner)
    if not outcomes:
        typer.echo("retry: nothing to send again")
        waiting = outbox.given_up(engine)
        if waiting:
            typer.echo(f"needs a person: {waiting} rows given up (labsync retry --given-up sends them again)")
        return 0 if not waiting else 1
    typer.echo(f"retry: sent {summary.sent} rows again: {_counts_text(summary.counts)}")
    for o in outcomes:
        counts = ", ".join(f"{k} {v}" for k, v in o["counts"].items() if v and k != "rejected before sending")
        typer.echo(f"{o['name']} (batch {o['batch_id']}): {o['status']} ({counts})")
    if error is not None:
        typer.echo(f"labsync: {error}; the rows not sent go out on the next run", err=True)
        return max(error.exit_code, 1)
    return 1 if inbox.needs_attention(outcomes) else 0


def _dry_run(engine, settings: Settings, lgc, file: Path, out: Path | None) -> int:
    """Validate, then write the requests a load would send, tokens masked. Sends nothing and
    writes nothing to the warehouse; consults the ledger (read only) to leave out rows a load
    would skip."""
    from etl.claims import now
    from etl.intake.validate import CsvValidation
    from etl.lgc.client import LgcClient, order_url
    from etl.orders import ledger, outbox
    from etl.states import OutboxState

    validation = CsvValidation(file)
    target = out or file.with_name(f"{file.stem}.requests.jsonl")
    handle = sys.stdout if str(target) == "-" else open(target, "w", encoding="utf-8")  # noqa: SIM115
    would, settled = 0, 0
    written: list[str] = []  # the clientOrderIds whose bodies were written (the audit's subjects)
    try:
        if not lgc.api_token:
            handle.write(json.dumps({
                "method": "POST", "url": f"{lgc.base_url}/oauth2/token?grant_type=client_credentials",
                "headers": {"Authorization": "Basic ***",
                            "Content-Type": "application/x-www-form-urlencoded",
                            "Accept": "application/json"},
                "body": "grant_type=client_credentials",
            }) + "\n")
        at = now()
        for chunk in validation.chunks():
            items = [outbox.staged(row, 0, at, None) for row in chunk]  # the very bodies a load would store
            known = ledger.lookup(engine, [i["client_order_id"] for i in items])
            for item in items:
                if item["outcome"] != OutboxState.QUEUED:
                    continue  # cannot be mapped: rejected locally, never sent
                if not ledger.would_send(known.get(item["client_order_id"]), item["body_sha256"]):
                    settled += 1
                    continue
                would += 1
                written.append(item["client_order_id"])
                handle.write(json.dumps({
                    "line": item["line"], "method": "PUT", "url": order_url(lgc, item["client_order_id"]),
                    "headers": LgcClient.headers("***"), "body": json.loads(item["body"]),
                }, ensure_ascii=False) + "\n")
    finally:
        if handle is not sys.stdout:
            handle.close()
    from etl import audit
    from etl.states import AuditAction

    audit.record(engine, AuditAction.DRY_RUN_WRITTEN, "order", written, would,
                 detail="standard output" if str(target) == "-" else Path(target).name)
    result = validation.result
    typer.echo(result.summary(), err=str(target) == "-")
    typer.echo(
        f"dry run: {would} requests would be sent ({settled} rows already settled in the ledger); "
        f"{'written above' if str(target) == '-' else f'written to {target}'}. Nothing was sent.",
        err=str(target) == "-",
    )
    return 1 if result.rejected_rows else 0
