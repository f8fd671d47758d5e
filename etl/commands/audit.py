"""Accountability commands: `labsync audit` (the trail of who saw or wrote PHI, etl.audit) and
`labsync purge` (the retention of each class of PHI, etl.retention)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import typer

from etl.commands import jsonout


def _since(text: str | None) -> datetime | None:
    """--since: an ISO date or time (UTC unless it says), or a number of days back (`7d`)."""
    if text is None:
        return None
    raw = text.strip()
    if raw.endswith("d") and raw[:-1].isdigit():
        return datetime.now(UTC) - timedelta(days=int(raw[:-1]))
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter("give a date or time (2026-05-01, 2026-05-01T08:00Z) or days back (7d)",
                                 param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        since: str | None = typer.Option(None, "--since", metavar="WHEN", help="Only rows at or after this "
                                         "date or time (UTC), e.g. 2026-05-01, or days back, e.g. 7d."),
        who: str | None = typer.Option(None, "--who", help="Only rows whose actor contains this "
                                       "(an OS user, airflow:DAG_ID, receiver:ADDRESS)."),
        order: str | None = typer.Option(None, "--order", metavar="ID", help="Only rows naming this subject "
                                         "id (a clientOrderId, a batch id, a Rupa order id)."),
        limit: int = typer.Option(200, help="The most recent N rows (0 = all)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the audit trail: who saw or wrote PHI, when, what, which subjects (ids only).

        Commands that show or write PHI (status of an order or a batch, reports and fix files,
        dry-run request files, results stored), the DAG tasks, the webhook receiver and every
        purge add a row; nothing changes or deletes one but the trail's own retention."""
        from etl import audit as trail
        from etl import warehouse
        from etl.settings import Settings

        engine = warehouse.connect(Settings.from_env().warehouse_url)
        rows = trail.query(engine, since=_since(since), who=who, order=order, limit=limit or None)
        if as_json:
            typer.echo(jsonout.dumps({"rows": rows, "count": len(rows)}))
            raise typer.Exit(0)
        from rich.console import Console
        from rich.table import Table

        table = Table("at", "who", "action", "subjects", "records", "detail", title="labsync audit")
        for r in rows:
            ids = r["subject_ids"] or []
            shown = ", ".join(ids[:5]) + (f" (+{len(ids) - 5})" if len(ids) > 5 else "")
            table.add_row(jsonout.iso(r["at"]), r["actor"], r["action"], f"{r['subject_kind']}: {shown}" if ids
                          else r["subject_kind"], str(r["record_count"]), r["detail"] or "")
        Console(width=None if sys.stdout.isatty() else 200).print(table)
        typer.echo(f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        raise typer.Exit(0)

    @app.command()
    def purge(
        dry_run: bool = typer.Option(False, "--dry-run", help="Print what would go, by class and count; "
                                     "change nothing."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """Drop what is older than its retention and no longer needed (what the labsync_retention
        DAG does daily).

        Classes and their settings (days): webhook_bodies, result_documents, rejected_values,
        outbox_bodies, batch_files (processed/ and failed/ of the inbox) and audit, each
        LABSYNC_RETENTION_<CLASS>_DAYS. Never removes what is still needed: events not applied,
        results not downloaded, rows that may still be sent, files of batches not finished.
        Each class purged adds an audit row."""
        from etl import warehouse
        from etl.retention import purge as run
        from etl.settings import Settings

        settings = Settings.from_env()
        report = run(warehouse.connect(settings.warehouse_url), settings, dry_run=dry_run)
        if as_json:
            typer.echo(jsonout.dumps(report.as_dict()))
            raise typer.Exit(0)
        verb = "would purge" if dry_run else "purged"
        for c, n in report.counts().items():
            typer.echo(f"{c}: {verb} {n} (older than {report.retention[c]} days)")
        if dry_run:
            typer.echo("dry run: nothing was changed.")
        raise typer.Exit(0)
