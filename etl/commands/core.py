"""Foundation commands: `labsync db upgrade`, `labsync validate`, `labsync sandbox`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from etl.errors import LabsyncError
from etl.settings import SANDBOX_PORT, Settings


def register(app: typer.Typer) -> None:
    db = typer.Typer(help="Warehouse schema management.", no_args_is_help=True)

    @db.command("upgrade")
    def db_upgrade() -> None:
        """Create or migrate the warehouse schema to the newest revision."""
        from etl import warehouse

        settings = Settings.from_env()
        engine = warehouse.connect(settings.warehouse_url)
        typer.echo(f"warehouse schema is current ({engine.url.render_as_string(hide_password=True)})")

    app.add_typer(db, name="db")

    @app.command()
    def validate(
        file: Path = typer.Argument(..., help="The order-batch CSV file."),
        record: bool = typer.Option(
            True, "--record/--no-record", help="Record the batch and its rejected rows in the warehouse."
        ),
    ) -> None:
        """Check every row of an order batch; write FILE.rejects.csv beside it.

        Exit 0: every row is valid. 1: some rows were rejected. 2: the file cannot be used."""
        from etl.batches.validate import CsvValidation

        if record:
            from etl import warehouse
            from etl.batches import records

            engine = warehouse.connect(Settings.from_env().warehouse_url)
            batch_id, validation = records.open_batch(engine, file)
            validation.run()
            result = records.close_batch(engine, batch_id, validation)
        else:
            result = CsvValidation(file).run()
        typer.echo(result.summary())
        raise typer.Exit(0 if result.rejected_rows == 0 else 1)

    @app.command()
    def inbox(
        folder: Path = typer.Option(None, help="The inbox folder (default: LABSYNC_INBOX or ./inbox)."),
    ) -> None:
        """Process every CSV file waiting in the inbox once: validate, load, summarise, move.

        What the order_batches DAG does, in one process. Exit 0 when every batch went through,
        1 when some rows were rejected or failed or a file was unusable."""
        from dataclasses import replace

        from etl import warehouse
        from etl.batches import inbox as inbox_mod

        settings = Settings.from_env()
        if folder is not None:
            settings = replace(settings, inbox=folder)
        engine = warehouse.connect(settings.warehouse_url)
        try:
            outcomes = inbox_mod.run_once(engine, settings)
        except LabsyncError as exc:  # e.g. the vendor is unreachable: nothing is lost
            typer.echo(f"labsync: {exc}; the files wait in {inbox_mod.InboxPaths(settings.inbox).processing} "
                       "and the next run processes them", err=True)
            raise typer.Exit(exc.exit_code) from None
        if not outcomes:
            typer.echo(f"inbox {settings.inbox}: nothing to do")
            raise typer.Exit(0)
        bad = False
        for o in outcomes:
            counts = ", ".join(f"{k} {v}" for k, v in o.get("counts", {}).items() if v)
            typer.echo(f"{o['name']}: {o['status']}" + (f" ({counts})" if counts else "")
                       + (f": {o['error']}" if o.get("error") else ""))
            bad = bad or o["status"] in ("unusable", "incomplete") or any(
                o.get("counts", {}).get(k) for k in ("failed", "pending", "rejected", "rejected before sending"))
        raise typer.Exit(1 if bad else 0)

    @app.command()
    def batches(
        limit: int = typer.Option(20, help="The most recent N batches."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """The outcome table: one line per batch file, with its rows by outcome."""
        import json

        import sqlalchemy as sa
        from rich.console import Console
        from rich.table import Table

        from etl import warehouse
        from etl.lgc import ledger
        from etl.warehouse import batch_files

        engine = warehouse.connect(Settings.from_env().warehouse_url)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(batch_files).order_by(batch_files.c.id.desc()).limit(limit)).mappings().all()
        out = []
        for b in reversed(rows):
            counts = ledger.state_counts(engine, batch_ids=[b["id"]])
            out.append({
                "batch": b["id"], "file": b["file_name"], "status": b["status"], "rows": b["total_rows"],
                "rejected_before_sending": b["rejected_rows"], **{s: counts.get(s, 0) for s in
                ("accepted", "conflict", "rejected", "failed", "pending")}, "error": b["error"],
            })
        if json_out:
            typer.echo(json.dumps(out, indent=2))
            raise typer.Exit(0)
        table = Table(title="labsync batches")
        for col in ("batch", "file", "status", "rows", "invalid", "accepted", "conflict", "rejected", "failed", "pending"):
            table.add_column(col, justify="right" if col not in ("file", "status") else "left")
        for o in out:
            table.add_row(*(str(v) if v is not None else "" for v in (
                o["batch"], o["file"], o["status"], o["rows"], o["rejected_before_sending"], o["accepted"],
                o["conflict"], o["rejected"], o["failed"], o["pending"])))
        Console(width=None if sys.stdout.isatty() else 160).print(table)
        for o in out:
            if o["error"]:
                typer.echo(f"batch {o['batch']} ({o['file']}): {o['error']}")

    @app.command()
    def sandbox(
        port: int = typer.Option(SANDBOX_PORT, help="Port on 127.0.0.1."),
        patients: int = typer.Option(50, help="Synthetic Rupa patients to seed."),
        lab_tests: int = typer.Option(20, help="Synthetic Rupa lab tests to seed."),
        rupa_events_url: str = typer.Option(
            None, "--rupa-events-url", help="Send the Rupa sandbox's order events to this URL, e.g. "
            "http://127.0.0.1:8900/webhooks/rupa (also: POST /_sandbox/rupa/events)."),
    ) -> None:
        """Serve the local LetsGetChecked and Rupa sandbox APIs on 127.0.0.1 until interrupted."""
        from etl.sandbox.server import Sandbox, serve

        sb = Sandbox.with_seed(patients=patients, lab_tests=lab_tests) if hasattr(Sandbox, "with_seed") else Sandbox()
        if rupa_events_url:
            sb.rupa.checkout.sender.configure(url=rupa_events_url)
        typer.echo(f"sandbox: LetsGetChecked at http://127.0.0.1:{port}/lgc, Rupa at http://127.0.0.1:{port}/rupa")
        serve(sb, port=port)
