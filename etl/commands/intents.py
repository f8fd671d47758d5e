"""`labsync intents FILE.csv [--dry-run]` and `labsync intents --inbox`: Rupa order intents from
a CSV (etl.checkout.intents).

Exit codes: 0 every row has its cart, 1 some rows were rejected, failed or have an unknown
outcome (the next run sends those again), 2 the file or the configuration is unusable
(including credentials Rupa refused).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def intents(
        file: Path | None = typer.Argument(None, help="The order-intents CSV (row_id, rupa_patient_id or "
                                           "first_name/last_name/email, lab_test_ids, return_url)."),
        inbox: bool = typer.Option(False, "--inbox", help="Instead of FILE: every file waiting in the "
                                   "inbox's intents/ folder, once (what the rupa_checkout DAG does)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and write the requests a run "
                                     "would send (tokens masked); send nothing, record nothing."),
        requests_file: Path | None = typer.Option(
            None, "--requests", help="--dry-run: where to write the requests as JSON lines "
            "(default FILE.requests.jsonl; '-' for standard output)."),
    ) -> None:
        """Create one Rupa order intent (a cart) per row; write FILE.summary.html with each
        patient's checkout link for the practitioner, and FILE.checkout.csv of the links."""
        from etl import warehouse
        from etl.checkout import intents as mod
        from etl.checkout.inbox import IntentsInbox, process_intents_inbox
        from etl.commands.core import without_name
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.rupa.validated()  # bad configuration: exit 2 before the file is touched
        if (file is None) == (not inbox):
            typer.echo("labsync: give one FILE.csv, or --inbox", err=True)
            raise typer.Exit(2)
        engine = warehouse.connect(settings.warehouse_url)
        from etl import audit
        from etl.states import AuditAction

        if inbox:
            outcomes = process_intents_inbox(engine, settings)
            for o in outcomes:
                audit.record_outcome_reports(engine, o)
            if not outcomes:
                typer.echo(f"inbox {IntentsInbox.of(settings).root}: nothing to do")
            for o in outcomes:
                counts = ", ".join(f"{k} {v}" for k, v in (o.get("counts") or {}).items() if v)
                typer.echo(f"{o['name']}: {o['status']}" + (f" ({counts})" if counts else "")
                           + (f": {without_name(o['error'], o['name'])}" if o.get("error") else ""))
            bad = any(o["status"] != "loaded" or o.get("rejected_rows") for o in outcomes)
            raise typer.Exit(1 if bad else 0)
        assert file is not None  # one of FILE and --inbox, checked above (narrows the type)
        if dry_run:
            target = requests_file or file.with_name(f"{file.stem}.requests.jsonl")
            to_stdout = str(target) == "-"
            handle = sys.stdout if to_stdout else open(target, "w", encoding="utf-8")  # noqa: SIM115
            try:
                would, settled, validation = mod.dry_run(engine, settings, file, handle)
            finally:
                if not to_stdout:
                    handle.close()
            audit.record(engine, AuditAction.DRY_RUN_WRITTEN, "intent", [], would,
                         detail="standard output" if to_stdout else target.name)
            typer.echo(validation.result.summary(), err=to_stdout)
            typer.echo(f"dry run: {would} rows would be sent ({settled} already settled in the ledger); "
                       f"{'written above' if to_stdout else f'requests written to {target}'}. Nothing was sent.",
                       err=to_stdout)
            raise typer.Exit(1 if validation.result.rejected_rows else 0)
        outcome = mod.process_intents_file(engine, settings, file)
        audit.record_outcome_reports(engine, outcome.as_dict())
        typer.echo(outcome.line())
        if outcome.rejects_path:
            typer.echo(f"rejected rows: {outcome.rejects_path}")
        typer.echo(f"checkout links: {outcome.summary_path} (and {outcome.checkout_path})")
        raise typer.Exit(outcome.exit_code)
