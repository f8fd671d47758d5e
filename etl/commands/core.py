"""Foundation commands: `labsync db upgrade`, `labsync validate`, `labsync sandbox`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from etl.errors import Interrupted
from etl.settings import SANDBOX_PORT  # the default of `sandbox --port`, shown in its help

# `labsync batches`: rows per outcome, from the outbox (etl.states.OutboxState)
BATCH_COLUMNS = ("accepted", "already_settled", "conflict", "rejected", "failed", "unconfirmed", "pending",
                 "queued", "given_up")
BATCH_HEADERS = {"already_settled": "settled before", "given_up": "needs a person"}


def without_name(error: str, name: str) -> str:
    """An unusable file's reason without its own name in front (the line names the file)."""
    return error[len(name) + 2:] if error.startswith(f"{name}: ") else error


def _release_on_interrupt(engine, owner: str) -> None:
    """Ctrl-C outside the loader (validating, finishing): give up this run's claims at once so
    the next run takes its files over without waiting for the lease."""
    import contextlib

    from etl.intake import records

    with contextlib.suppress(Exception):
        records.release_all(engine, owner=owner)


def register(app: typer.Typer) -> None:
    db = typer.Typer(help="Warehouse schema management.", no_args_is_help=True)

    @db.command("upgrade")
    def db_upgrade() -> None:
        """Create or migrate the warehouse schema to the newest revision (run it at deploy time).

        Takes a lock first (pg_advisory_xact_lock on PostgreSQL, the write lock on SQLite), so
        two upgrades at once never race: the second waits, then finds nothing to do."""
        from etl import warehouse
        from etl.settings import Settings

        settings = Settings.from_env()
        engine = warehouse.upgrade_url(settings.warehouse_url)
        heads = ", ".join(sorted(warehouse.SCHEMA_HEADS))
        typer.echo(f"warehouse schema is current at {heads} ({engine.url.render_as_string(hide_password=True)})")

    @db.command("new-key")
    def db_new_key() -> None:
        """Print a new Fernet key for LABSYNC_FERNET_KEY (the tokens stored in the warehouse)."""
        from etl.vault import new_key

        typer.echo(new_key())

    @db.command("rotate-key")
    def db_rotate_key() -> None:
        """Re-encrypt every stored token with the first key of LABSYNC_FERNET_KEY="new,old".

        Rows stored in plain text by an older labsync are encrypted too. Afterwards the old key
        can be dropped from LABSYNC_FERNET_KEY."""
        from etl import warehouse
        from etl.orders import outbox
        from etl.rupa import auth
        from etl.settings import Settings
        from etl.vault import vault_for

        settings = Settings.from_env()
        engine = warehouse.connect(settings.warehouse_url)
        vault = vault_for(settings.fernet_key, engine)
        with engine.begin() as conn:  # one transaction: every row re-encrypted, or none
            tokens = auth.reseal_tokens(conn, vault)
            bodies = outbox.reseal_bodies(conn, vault)
        typer.echo(f"re-encrypted {tokens} token row{'s' if tokens != 1 else ''} and {bodies} waiting "
                   f"order bod{'ies' if bodies != 1 else 'y'} with the first key of {vault.source}")

    app.add_typer(db, name="db")

    @app.command()
    def validate(
        file: Path = typer.Argument(..., help="The order-batch CSV file."),
        record: bool = typer.Option(
            False, "--record/--no-record", help="Also record the batch and its rejected rows in the "
            "warehouse (shown by `labsync batches`). Without it the check is dry: nothing is recorded."
        ),
    ) -> None:
        """Check every row of an order batch; write FILE.rejects.csv and FILE.fix.csv beside it.

        A dry check: nothing goes to the warehouse or to LetsGetChecked unless --record is
        given, so a file checked before it is dropped in the inbox is not a batch yet. Exit 0: every row is valid. 1: some rows were rejected. 2: the file cannot be used."""
        from etl.intake.names import fix_path_for
        from etl.intake.validate import CsvValidation

        # the same reports the inbox writes beside a batch, by the same code (CsvValidation)
        fix = fix_path_for(file)
        if record:
            from etl import warehouse
            from etl.intake import records
            from etl.settings import Settings

            engine = warehouse.connect(Settings.from_env().warehouse_url)
            from etl.orders.enrich import rupa_lookup_for

            batch_id, validation = records.open_batch(engine, file, rupa_lookup=rupa_lookup_for(engine),
                                                      fix_path=fix)
            validation.run()
            result = records.close_batch(engine, batch_id, validation)
            from etl import audit

            audit.record_reports(engine, file, batch_id=batch_id, count=result.rejected_rows)
        else:
            result = CsvValidation(file, fix_path=fix).run()
        typer.echo(result.summary())
        raise typer.Exit(0 if result.rejected_rows == 0 else 1)

    @app.command()
    def inbox(
        folder: str = typer.Option(None, help="The inbox: a folder or a URL such as s3://bucket/prefix "
                                   "(default: LABSYNC_INBOX or ./inbox)."),
    ) -> None:
        """Process every CSV file waiting in the inbox once: validate, load, summarise, move.

        What the order_batches DAG does, in one process, including re-sending the rows of
        earlier incomplete batches. Several can run at once (beside the DAG too): each file is
        processed by one of them. Exit 0 when every batch went through, 1 when some rows were
        rejected or are not settled yet, or a file was unusable; 2 for refused credentials."""
        from dataclasses import replace

        from etl import warehouse
        from etl.claims import cli_owner
        from etl.intake.storage import display
        from etl.orders import inbox as inbox_mod
        from etl.settings import Settings

        settings = Settings.from_env().checked()
        if folder is not None:
            settings = replace(settings, inbox=folder)
        engine = warehouse.connect(settings.warehouse_url)
        owner = cli_owner()
        try:
            run = inbox_mod.run_once(engine, settings, owner=owner)
        except KeyboardInterrupt:
            _release_on_interrupt(engine, owner)
            raise Interrupted("interrupted; rows not sent stay in the outbox and go out on the next run") from None
        from etl.commands.alerts import send_after_run

        send_after_run(engine, settings)  # LABSYNC_ALERTS: what needs a person, as the DAG sends it
        outcomes = run.outcomes
        if not outcomes and run.error is None:
            typer.echo(f"inbox {display(settings.inbox)}: nothing to do")
            raise typer.Exit(0)
        from etl.redact import clean

        bad = False
        for o in outcomes:
            counts = ", ".join(f"{k} {v}" for k, v in o.get("counts", {}).items() if v)
            label = f"{o['name']}" + (" (rows sent again)" if o.get("retried") else "")
            typer.echo(clean(f"{label}: {o['status']}" + (f" ({counts})" if counts else "")
                             + (f": {without_name(o['error'], o['name'])}" if o.get("error") else ""),
                             limit=None))
            bad = bad or o["status"] in ("unusable", "incomplete") or any(
                o.get("counts", {}).get(k) for k in ("failed", "unconfirmed", "pending", "queued", "given_up", "rejected",
                                                      "rejected before sending"))
        if run.error is not None:
            typer.echo(f"labsync: {run.error}; the rows not sent wait in the outbox and go out on the next "
                       "run (labsync inbox, labsync retry or the DAG)", err=True)
            raise typer.Exit(max(run.error.exit_code, 1))
        raise typer.Exit(1 if bad else 0)

    @app.command()
    def batches(
        limit: int = typer.Option(20, help="The most recent N batches (0 = no limit)."),
        since: str | None = typer.Option(None, "--since", metavar="WHEN", help="Only batches received at or "
                                         "after this: a date or time (UTC unless it says) or days back (7d)."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """The outcome table: one line per batch file, with its rows by outcome (the newest
        --limit batches, oldest of them first)."""
        from rich.console import Console
        from rich.table import Table

        from etl import warehouse
        from etl.commands.audit import _since
        from etl.intake import records
        from etl.orders import outbox
        from etl.redact import clean
        from etl.settings import Settings

        if limit < 0:
            raise typer.BadParameter("give 0 (no limit) or more", param_hint="--limit")
        when = _since(since)
        engine = warehouse.connect(Settings.from_env().warehouse_url)
        rows = records.recent(engine, limit=limit or None, since=when)
        per_batch = outbox.counts(engine, [b["id"] for b in rows])
        out = []
        for b in reversed(rows):
            counts = per_batch[b["id"]]
            out.append({
                "batch": b["id"], "file": b["file_name"], "status": b["status"], "rows": b["total_rows"],
                "rejected_before_sending": b["rejected_rows"], **{s: counts.get(s, 0) for s in BATCH_COLUMNS},
                "error": clean(b["error"]), "received_at": b["received_at"], "processed_at": b["processed_at"],
            })
        if json_out:
            from etl.commands import jsonout

            typer.echo(jsonout.dumps(out))
            raise typer.Exit(0)
        table = Table(title="labsync batches")
        headers = ("batch", "file", "status", "rows", "invalid", *(BATCH_HEADERS.get(c, c) for c in BATCH_COLUMNS))
        for col in headers:
            table.add_column(col, justify="right" if col not in ("file", "status") else "left")
        for o in out:
            table.add_row(*(str(v) if v is not None else "" for v in (
                o["batch"], o["file"], o["status"], o["rows"], o["rejected_before_sending"],
                *(o[c] for c in BATCH_COLUMNS))))
        Console(width=None if sys.stdout.isatty() else 220).print(table)
        for o in out:
            if o["error"]:
                typer.echo(f"batch {o['batch']} ({o['file']}): {without_name(o['error'], o['file'])}")

    @app.command()
    def sandbox(
        port: int = typer.Option(SANDBOX_PORT, envvar="LABSYNC_SANDBOX_PORT", help="Port on 127.0.0.1 (the "
                                 "default base URLs follow LABSYNC_SANDBOX_PORT too)."),
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
        from etl import logs

        logs.serving()
        typer.echo(f"sandbox: LetsGetChecked at http://127.0.0.1:{port}/lgc, Rupa at http://127.0.0.1:{port}/rupa")
        serve(sb, port=port)

    @app.command()
    def doctor(
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        wait: float = typer.Option(0, "--wait", metavar="SECONDS", help="Check again until every check "
                                   "passes or this many seconds went by (a sandbox or database still starting)."),
    ) -> None:
        """Check that this deployment is ready: settings, warehouse and its schema revision, the
        encryption key, the inbox, and both vendors (a token fetched, nothing sent).

        Prints each check with what to fix. Exit 0: all good. 2: something needs fixing."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from etl import doctor as doc

        checks = doc.run_until_ok(wait)
        bad = [c for c in checks if not c.ok]
        if json_out:
            from etl.commands import jsonout

            typer.echo(jsonout.dumps({"ok": not bad, "checks": [c.as_dict() for c in checks]}))
            raise typer.Exit(2 if bad else 0)
        table = Table("check", "status", "details", "what to fix", title="labsync doctor")
        style = {doc.OK: "green", doc.PROBLEM: "bold red", doc.SKIPPED: "yellow"}
        for c in checks:
            table.add_row(c.name, Text(c.status, style=style[c.status]), Text(c.detail), Text(c.fix))
        Console(width=None if sys.stdout.isatty() else 160).print(table)
        if bad:
            problems = sum(c.status == doc.PROBLEM for c in bad)
            skipped = len(bad) - problems
            typer.echo(f"{problems} problem{'s' if problems != 1 else ''} to fix"
                       + (f", {skipped} check{'s' if skipped != 1 else ''} not run because of them" if skipped else "")
                       + ".")
            raise typer.Exit(2)
        typer.echo("all checks passed.")
        raise typer.Exit(0)
