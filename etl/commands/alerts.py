"""`labsync alerts`: what needs a person, sent to the destinations in LABSYNC_ALERTS (etl.alerts),
the same alerts the DAGs send; `labsync alerts test` sends a test message to each destination."""

from __future__ import annotations

import sys

import typer

from etl.commands import jsonout


def send_after_run(engine, settings) -> None:
    """After a command that does what a DAG does (`labsync inbox`): the same alerts, when
    LABSYNC_ALERTS names destinations. A destination that fails is named on stderr; the
    command's own outcome stands."""
    if not settings.alerts.validated().destinations:
        return
    from etl import alerts as al

    report = al.evaluate(engine, settings)
    if report.fired or report.resolved or report.errors:
        typer.echo(report.line(), err=True)
    for error in report.errors:
        typer.echo(f"alert not sent: {error}", err=True)


def register(app: typer.Typer) -> None:
    alerts = typer.Typer(invoke_without_command=True, no_args_is_help=False)

    @alerts.callback()
    def check(
        ctx: typer.Context,
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        no_send: bool = typer.Option(False, "--no-send", help="List only: evaluate nothing, send nothing."),
    ) -> None:
        """Check what needs a person now, send what is new or cleared, and list what fired and what is still open.

        Conditions: a batch unusable or incomplete, rows given up, the breaker tripped or the
        credentials refused, webhook events unapplied and open orders not checked for longer than
        LABSYNC_ALERT_WEBHOOK_MINUTES / LABSYNC_ALERT_UNCHECKED_MINUTES, and (from Airflow) a failed
        run or a run past its deadline. Each is sent once to every connection in LABSYNC_ALERTS
        (read from AIRFLOW_CONN_<ID>), with a "resolved" message when it clears. Exit code 1 while
        a condition is open."""
        if ctx.invoked_subcommand is not None:
            return
        from etl import alerts as al
        from etl import warehouse
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.alerts.validated()
        engine = warehouse.connect(settings.warehouse_url)
        report = None if no_send else al.evaluate(engine, settings)
        rows = al.status(engine)
        still_open = [r for r in rows if r["state"] == "open"]
        if as_json:
            typer.echo(jsonout.dumps({"alerts": rows, "open": len(still_open),
                                      "report": report.as_dict() if report else None}))
            raise typer.Exit(1 if still_open else 0)
        if report is not None:
            typer.echo(report.line(), err=True)
            for error in report.errors:
                typer.echo(f"not sent: {error}", err=True)
        from rich.console import Console
        from rich.table import Table

        table = Table("state", "alert", "first seen", "last seen", "repeats", "sent", title="labsync alerts")
        for r in rows:
            table.add_row(r["state"], r["title"], jsonout.iso(r["first_seen"]), jsonout.iso(r["last_seen"]),
                          str(r["repeats"]), r["sent_to"] or (r["send_error"] and "failed") or "-")
        Console(width=None if sys.stdout.isatty() else 200).print(table)
        typer.echo(f"{len(still_open)} open")
        raise typer.Exit(1 if still_open else 0)

    @alerts.command("test")
    def test() -> None:
        """Send a test message to each destination in LABSYNC_ALERTS; exit 2 if one did not take it."""
        from etl.alerts import test_message
        from etl.alerts.destinations import send_all
        from etl.errors import ConfigError
        from etl.settings import Settings

        settings = Settings.from_env()
        if not settings.alerts.validated().destinations:
            raise ConfigError("LABSYNC_ALERTS is empty: name the Airflow connection ids alerts go to, "
                              "e.g. LABSYNC_ALERTS=smtp_alerts,slack_alerts")
        took, errors = send_all(settings, [test_message()])
        for conn_id in took:
            typer.echo(f"sent: {conn_id}")
        for error in errors:
            typer.echo(f"not sent: {error}", err=True)
        raise typer.Exit(2 if errors else 0)

    app.add_typer(alerts, name="alerts")
