"""LetsGetChecked commands: `labsync load FILE.csv [--dry-run]` and `labsync status`.

`load` validates the file chunk by chunk (reject report beside it, as `labsync validate` does)
and loads each chunk's valid rows as they come, so a large batch never sits in memory.
Exit codes: 0 every row accepted (or conflict), 1 some rows rejected/failed/busy, 2 unusable
input or configuration (including credentials refused by LetsGetChecked).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from etl.settings import Settings

STATE_ORDER = ("accepted", "conflict", "rejected", "failed", "pending", "busy", "duplicate")


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


def _rows(validation) -> Iterator[dict]:
    for chunk in validation.chunks():
        yield from chunk


def _json_default(value):
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


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

        settings = Settings.from_env()
        lgc = settings.lgc.validated()  # ConfigError (exit 2) before the file is touched
        engine = warehouse.connect(settings.warehouse_url)
        if dry_run:
            raise typer.Exit(_dry_run(engine, settings, lgc, file, requests_file))
        raise typer.Exit(_load(engine, settings, file))

    @app.command()
    def status(
        client_order_id: str | None = typer.Argument(None, help="One clientOrderId to show."),
        batch: str | None = typer.Option(None, "--batch", help="A batch's file name (or id)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        limit: int = typer.Option(50, help="At most this many rows in a table (0 = all)."),
    ) -> None:
        """Show what happened to orders: per clientOrderId, per batch, or counts for the ledger."""
        from etl import warehouse
        from etl.lgc import ledger, lifecycle

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
            items = lifecycle.status_counts(engine)
            if as_json:
                typer.echo(json.dumps({"counts": counts, "items": items}))
            else:
                typer.echo(f"ledger: {_counts_text(counts)}")
                if items:
                    typer.echo("items: " + ", ".join(f"{k} {v}" for k, v in sorted(items.items())))
            raise typer.Exit(0)
        rows = ledger.status_rows(engine, client_order_id=client_order_id, batch_ids=batch_ids)
        if not rows:
            typer.echo(f"labsync: {client_order_id!r} is not in the ledger", err=True)
            raise typer.Exit(1)
        statuses = lifecycle.item_statuses(engine, [r["client_order_id"] for r in rows])
        for r in rows:  # each order's items at LetsGetChecked (from `labsync track`)
            r["items"] = statuses.get(r["client_order_id"], [])
        if as_json:
            out = rows[0] if client_order_id is not None else rows
            typer.echo(json.dumps(out, default=_json_default, indent=2))
            raise typer.Exit(0)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        shown = rows if not limit else rows[:limit]
        table = Table("clientOrderId", "batch", "line", "state", "HTTP", "attempts",
                      "order items", "item statuses", "last error", "updated")
        for r in shown:
            items = ", ".join(f"{i.get('code')}={i.get('id')}" for i in (r["order_item_ids"] or []))
            table.add_row(r["client_order_id"], str(r["batch"] or ""), str(r["line"] or ""),
                          r["state"], str(r["http_status"] or ""), str(r["attempts"]), items,
                          lifecycle.describe_items(r["items"]), r["last_error"] or "",
                          _json_default(r["updated_at"]))
        console = Console(width=max(Console().width, 160))
        console.print(table)
        if len(shown) < len(rows):
            console.print(f"... {len(rows) - len(shown)} more (use --limit 0 or --json)")
        console.print(f"{len(rows)} orders: {_counts_text(counts)}")
        raise typer.Exit(0)


def _load(engine, settings: Settings, file: Path) -> int:
    from etl.batches.records import close_batch, open_batch, set_status
    from etl.lgc.load import load_rows

    batch_id, validation = open_batch(engine, file)
    err = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[counts]}"))
    with Progress(*columns, console=err, disable=not err.is_terminal, transient=False) as bar:
        task = bar.add_task(f"loading {file.name}", total=_rough_rows(file), counts="")
        seen: dict[str, int] = {}

        def progress(result) -> None:
            seen[result.state] = seen.get(result.state, 0) + 1
            bar.update(task, advance=1, counts=_counts_text(seen))

        summary = load_rows(engine, settings, _rows(validation), batch_id=batch_id, progress=progress)
        bar.update(task, total=summary.rows)
    if summary.stopped:
        set_status(engine, batch_id, "validated")
        typer.echo(f"labsync: the batch stopped early: {summary.stopped}", err=True)
    else:
        result = close_batch(engine, batch_id, validation)
        set_status(engine, batch_id, "loaded")
        typer.echo(result.summary())
    typer.echo(
        f"LetsGetChecked: {_counts_text(summary.counts)} (sent {summary.sent}, "
        f"already settled {summary.skipped}, {summary.elapsed:.1f}s)"
    )
    typer.echo(f"details: labsync status --batch {file.name}")
    code = summary.exit_code
    if code == 0 and validation.result.rejected_rows:
        code = 1
    return code


def _dry_run(engine, settings: Settings, lgc, file: Path, out: Path | None) -> int:
    """Validate, then write the requests a load would send, tokens masked. Sends nothing and
    writes nothing to the warehouse; consults the ledger (read only) to leave out rows a load
    would skip."""
    from etl.batches.validate import CsvValidation
    from etl.lgc import ledger
    from etl.lgc.client import LgcClient, order_url
    from etl.lgc.load import prepare

    validation = CsvValidation(file)
    target = out or file.with_name(f"{file.stem}.requests.jsonl")
    handle = sys.stdout if str(target) == "-" else open(target, "w", encoding="utf-8")  # noqa: SIM115
    would, settled = 0, 0
    try:
        if not lgc.api_token:
            handle.write(json.dumps({
                "method": "POST", "url": f"{lgc.base_url}/oauth2/token?grant_type=client_credentials",
                "headers": {"Authorization": "Basic ***",
                            "Content-Type": "application/x-www-form-urlencoded",
                            "Accept": "application/json"},
                "body": "grant_type=client_credentials",
            }) + "\n")
        for chunk in validation.chunks():
            items = [prepare(row) for row in chunk]
            known = ledger.lookup(engine, [i.client_order_id for i in items])
            for item in items:
                if not ledger.would_send(known.get(item.client_order_id), item.sha256):
                    settled += 1
                    continue
                would += 1
                handle.write(json.dumps({
                    "line": item.line, "method": "PUT", "url": order_url(lgc, item.client_order_id),
                    "headers": LgcClient.headers("***"), "body": item.body,
                }, ensure_ascii=False) + "\n")
    finally:
        if handle is not sys.stdout:
            handle.close()
    result = validation.result
    typer.echo(result.summary(), err=str(target) == "-")
    typer.echo(
        f"dry run: {would} requests would be sent ({settled} rows already settled in the ledger); "
        f"{'written above' if str(target) == '-' else f'written to {target}'}. Nothing was sent.",
        err=str(target) == "-",
    )
    return 1 if result.rejected_rows else 0
