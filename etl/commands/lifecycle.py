"""LetsGetChecked after the PUT: `labsync track`, `labsync results`, `labsync cancel` and
`labsync lifecycle` (what the lgc_lifecycle DAG does, once). The work is in etl.orders.lifecycle
and etl.orders.results; these commands print and choose exit codes:

    0  everything asked about answered      1  some orders failed / were not found / refused
    2  configuration, credentials or an order/item that does not exist
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from etl.commands import jsonout

if TYPE_CHECKING:
    from etl.settings import Settings


def _engine(settings: Settings):
    from etl import warehouse

    return warehouse.connect(settings.warehouse_url)


def _batch_ids(engine, batch: str | None) -> list[int] | None:
    from etl.orders import ledger

    if batch is None:
        return None
    ids = ledger.find_batch_ids(engine, batch)
    if not ids:
        typer.echo(f"labsync: no batch named {batch!r} in the warehouse", err=True)
        raise typer.Exit(1)
    return ids


def register(app: typer.Typer) -> None:
    @app.command()
    def track(
        client_order_ids: list[str] = typer.Argument(None, help="Orders to ask about (default: every open one)."),
        batch: str | None = typer.Option(None, "--batch", help="Only the open orders of this batch (file name or id)."),
        stale_minutes: float | None = typer.Option(
            None, "--stale-minutes",
            help="Only open orders not checked for this many minutes (default without orders or --batch: "
                 "LABSYNC_TRACK_STALE_MINUTES, as the sweep)."),
        every_open: bool = typer.Option(
            False, "--all", help="Every open order, however recently checked (one GET each)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """GET orders from LetsGetChecked and record their items' statuses, barcodes and tracking.

        Without arguments: the open orders (accepted, with an item not yet in a final state:
        ResultsAvailable, Cancelled, ValidationFailed) not checked for LABSYNC_TRACK_STALE_MINUTES
        (default 60), and those never checked, as the sweep does: a history of thousands of
        open orders is not asked about again every time. --all asks about every open order.
        Prints items per status."""
        from etl.commands import progress as bars
        from etl.orders import lifecycle
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.lgc.validated()
        engine = _engine(settings)
        ids = _batch_ids(engine, batch)
        stale = _stale_seconds(stale_minutes)
        due_only = stale is None and not every_open and not client_order_ids and batch is None
        if due_only:
            stale = settings.lifecycle.stale_after
        with bars.bar("orders", show=not as_json) as bar:
            task = bar.add_task("tracking", total=None, note="")
            summary = lifecycle.track(
                engine, settings, client_order_ids or None, batch_ids=ids, stale_after=stale,
                progress=lambda coid, outcome: bar.update(task, advance=1))
        if as_json:
            typer.echo(jsonout.dumps({**summary.as_dict(), "not_found": summary.not_found,
                                      "failed": summary.failed}))
        else:
            if not summary.orders and due_only:
                typer.echo(f"track: no open order unchecked for {settings.lifecycle.stale_after / 60:g} minutes "
                           "(LABSYNC_TRACK_STALE_MINUTES); --all asks about every open order")
            elif not summary.orders:
                typer.echo("track: no open orders to ask about")
            else:
                typer.echo(summary.line())
            for coid in summary.not_found:
                typer.echo(f"  {coid}: LetsGetChecked does not know this order (HTTP 404)", err=True)
            for coid, why in summary.failed.items():
                typer.echo(f"  {coid}: not tracked: {why}", err=True)
        raise typer.Exit(summary.exit_code)

    @app.command()
    def results(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
        flagged: bool = typer.Option(False, "--flagged", help="Fetch nothing: list the observations (both "
                                     "vendors) flagged critical, or abnormal with --level abnormal."),
        level: str = typer.Option("", "--level", help="With --flagged: critical (the default, or "
                                  "LABSYNC_RESULTS_FLAG_LEVEL) or abnormal (abnormal and critical)."),
        reread: bool = typer.Option(False, "--reread", help="Fetch nothing: read every stored result document "
                                    "(both vendors) into lab_observations again: documents stored before "
                                    "that table existed. Idempotent."),
    ) -> None:
        """Fetch the results (JSON and HL7) of every item at ResultsAvailable that has none stored.

        Idempotent: a result is stored once however often this runs. Values are never printed.
        With --flagged: list the current lab observations that need a person (ids, test, code,
        interpretation, flags; never a value)."""
        if flagged or reread:
            from etl.commands.observations import list_flagged, reread_documents

            reread_documents(as_json) if reread else list_flagged(level, as_json)
            return
        from datetime import UTC, datetime

        from etl import audit
        from etl.orders.results import fetch_results
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.lgc.validated()
        engine, since = _engine(settings), datetime.now(UTC)
        summary = fetch_results(engine, settings)
        audit.record_results(engine, since)  # the orders whose results were stored (ids only)
        if as_json:
            typer.echo(jsonout.dumps({**summary.as_dict(), "failed": summary.failed}))
        else:
            typer.echo(summary.line() if summary.candidates else "results: nothing due")
            for item_id, why in summary.failed.items():
                typer.echo(f"  item {item_id}: {why}", err=True)
        raise typer.Exit(summary.exit_code)

    @app.command()
    def cancel(
        client_order_id: str = typer.Argument(..., help="The order to cancel."),
        item: str | None = typer.Option(None, "--item", help="Only this order item (its id, or its kit code)."),
    ) -> None:
        """Ask LetsGetChecked to cancel an order's items (or one of them).

        The order is fetched first; an item whose kit reached the lab (KitArrivedAtLab or later)
        is refused here and nothing is sent for it. Others are PATCHed and marked
        `cancel requested` until `labsync track` sees them Cancelled."""
        from etl.orders import lifecycle
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.lgc.validated()
        settings.lifecycle.validated()
        report = lifecycle.cancel(_engine(settings), settings, client_order_id, item)
        for o in report.items:
            typer.echo(f"{client_order_id} {o.code or ''} {o.item_id}: {o.message}",
                       err=o.outcome.startswith("refused"))
        raise typer.Exit(report.exit_code)

    @app.command("lifecycle")
    def lifecycle_once(
        stale_minutes: float | None = typer.Option(
            None, "--stale-minutes", help="Sweep orders not checked for this long (default LABSYNC_TRACK_STALE_MINUTES)."),
    ) -> None:
        """What the lgc_lifecycle DAG does, once: apply stored webhook events (each order confirmed
        with a GET), sweep open orders not checked recently, fetch new results, read the
        results-letters feed (labsync program writes the program pages)."""
        from etl.orders import lifecycle
        from etl.orders.results import fetch_results
        from etl.settings import Settings

        settings = Settings.from_env()
        settings.lgc.validated()
        engine = _engine(settings)
        hooks = lifecycle.apply_webhooks(engine, settings)
        typer.echo(hooks.line())
        stale = _stale_seconds(stale_minutes)
        stale = settings.lifecycle.stale_after if stale is None else stale
        sweep = lifecycle.track(engine, settings, stale_after=stale)
        typer.echo("sweep: " + (sweep.line() if sweep.orders else "no open order is due"))
        from datetime import UTC, datetime

        from etl import audit

        since = datetime.now(UTC)
        found = fetch_results(engine, settings)
        audit.record_results(engine, since)
        typer.echo(found.line() if found.candidates else "results: nothing due")
        from etl.orders.outreach import poll_feed

        letters = poll_feed(engine, settings)  # results letters (issue 25)
        typer.echo(letters.line())
        bad = hooks.failed or sweep.exit_code or found.exit_code or "feed" in letters.failed
        raise typer.Exit(1 if bad else 0)


def _stale_seconds(minutes: float | None) -> float | None:
    """--stale-minutes in seconds, checked like LABSYNC_TRACK_STALE_MINUTES (nan, inf, negative:
    exit 2 naming it)."""
    from etl.errors import ConfigError
    from etl.settings import check_number

    if minutes is None:
        return None
    try:
        check_number("LABSYNC_TRACK_STALE_MINUTES", minutes)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("LABSYNC_TRACK_STALE_MINUTES", "--stale-minutes", 1)) from None
    return minutes * 60
