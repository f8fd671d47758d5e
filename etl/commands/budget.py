"""`labsync budget`: the LetsGetChecked budget shared by every loader of the deployment.

    labsync budget                 limits, Airflow pool size, loaders holding a share right now
    labsync budget --pool-slots    just the pool size, for `airflow pools set lgc_api N …`
    labsync budget --json
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def budget(
        pool_slots_only: bool = typer.Option(
            False, "--pool-slots", help="Print only how many slots the Airflow pool lgc_api needs."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show the LetsGetChecked rate and concurrency budget and who is using it."""
        from etl.lgc.budget import budget_status, pool_slots
        from etl.settings import Settings

        settings = Settings.from_env()
        if pool_slots_only:  # needs LGC_CONCURRENCY only: works where no credentials are set
            typer.echo(pool_slots(settings.lgc))
            raise typer.Exit(0)
        lgc = settings.lgc.validated()
        from etl import warehouse

        status = budget_status(warehouse.connect(settings.warehouse_url), lgc)
        if as_json:
            from etl.commands import jsonout

            typer.echo(jsonout.dumps(status, indent=None))
            raise typer.Exit(0)
        rate = f"{lgc.rate_limit:g} orders/s" if lgc.rate_limit else "no rate limit"
        typer.echo(f"LetsGetChecked budget ({status['vendor']}): {rate}, {lgc.concurrency} "
                   "requests in flight, for all loaders together")
        typer.echo(f"Airflow pool: airflow pools set lgc_api {status['pool_slots']} "
                   "\"LetsGetChecked load tasks\"")
        typer.echo(f"send slots booked ahead: {status['booked_ahead']:.2f}s")
        loaders = status["loaders"]
        typer.echo(f"loaders now: {len(loaders) or 'none'}")
        for row in loaders:
            typer.echo(f"  {row['holder']}: {row['held']} in flight allowed, wants {row['want']}, "
                       f"lease {row['lease_left']:.0f}s")
        raise typer.Exit(0)
