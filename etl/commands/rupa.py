"""Rupa commands: `labsync extract [patients|lab-tests|all]`, `labsync rupa authorize` and
`labsync rupa apply-events`.

Thin on purpose: the work is in etl.rupa (the DAGs call the same functions). Errors are raised
as our exception types; `etl.cli.main` prints them in one line with their exit code
(AuthError/ConfigError: 2).
"""

from __future__ import annotations

from enum import StrEnum

import typer


class StreamChoice(StrEnum):
    patients = "patients"
    lab_tests = "lab-tests"
    all = "all"


def register(app: typer.Typer) -> None:
    @app.command()
    def extract(
        stream: StreamChoice = typer.Argument(StreamChoice.all, help="Which Rupa stream to extract."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Copy Rupa patients and/or lab tests into the warehouse (a full sync that resumes an
        interrupted run)."""
        from etl import warehouse
        from etl.commands import progress as bars
        from etl.extract.streams import extract_stream
        from etl.rupa.client import open_client
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.rupa.validated()  # bad configuration: exit 2 before touching anything
        engine = warehouse.connect(settings.warehouse_url)
        streams = ["patients", "lab_tests"] if stream is StreamChoice.all else [stream.value.replace("-", "_")]
        summaries = []
        bar = bars.bar("rows", show=progress, transient=True)
        with bar, open_client(settings, engine) as client:
            for name in streams:
                task = bar.add_task(name.replace("_", " "), total=None, note="")

                def advance(rows: int, total: int | None, task=task) -> None:
                    if total is not None:
                        bar.update(task, total=total)
                    bar.advance(task, rows)

                summaries.append(extract_stream(engine, settings, name, client=client, progress=advance))
        for summary in summaries:
            typer.echo(summary.line())
        raise typer.Exit(0)

    rupa = typer.Typer(help="Rupa Health connection.", no_args_is_help=True)

    @rupa.command("authorize")
    def authorize(
        code: str = typer.Option(None, "--code",
                                 help="The authorization code, or the whole URL you were redirected to."),
    ) -> None:
        """Grant labsync access to a Rupa clinic once: open the printed URL, approve, paste the code
        (or the URL you were sent to). The tokens are stored in the warehouse."""
        from etl import warehouse
        from etl.rupa.auth import (
            authorization_url,
            exchange_code,
            new_state,
            parse_authorization_response,
        )
        from etl.settings import Settings

        settings = Settings.from_env()
        rupa_settings = settings.rupa.validated()
        if rupa_settings.api_token and not (rupa_settings.client_id and rupa_settings.client_secret):
            typer.echo("RUPA_API_TOKEN is set: nothing to authorize.")
            raise typer.Exit(0)
        state = new_state()
        if code is None:
            typer.echo("Open this URL in a browser, sign in as the practitioner and approve access:\n")
            typer.echo(f"  {authorization_url(rupa_settings, state)}\n")
        pasted = code if code is not None else typer.prompt(
            "Paste the code, or the whole URL you were redirected to")
        engine = warehouse.connect(settings.warehouse_url)
        tokens = exchange_code(engine, settings, parse_authorization_response(pasted, state if code is None else None))
        until = f", access token valid until {tokens.expires_at:%Y-%m-%d %H:%M:%S} UTC" if tokens.expires_at else ""
        typer.echo(f"Rupa authorized: tokens stored in the warehouse{until}.")
        raise typer.Exit(0)

    @rupa.command("apply-events")
    def apply_events(
        download: bool = typer.Option(True, "--download/--no-download",
                                      help="Download result files whose links are pending."),
    ) -> None:
        """Apply the Rupa events the webhook receiver stored (orders, ordered tests, patients,
        lab tests) and download new results. What the rupa_checkout DAG's rupa_events task does.

        Exit 0: all applied. 1: some events could not be applied or a result download is still
        pending (both are retried by the next run)."""
        from datetime import UTC, datetime

        from etl import audit, warehouse
        from etl.checkout.events import apply_events as run
        from etl.settings import Settings

        settings = Settings.from_env()
        engine, since = warehouse.connect(settings.warehouse_url), datetime.now(UTC)
        summary = run(engine, settings, download=download)
        audit.record_results(engine, since)  # the result files downloaded (order ids only)
        typer.echo(summary.line())
        raise typer.Exit(summary.exit_code)

    app.add_typer(rupa, name="rupa")
