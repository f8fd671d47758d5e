"""`labsync program [CODE]`: the program page (etl.program), written in the inbox under
`programs/<program>/` with its CSVs, and its numbers printed (`--json`: the same numbers and lists
the page shows). Exit 0, or 1 when a program named has no order in the warehouse."""

from __future__ import annotations

import typer

from etl.commands import jsonout


def register(app: typer.Typer) -> None:
    @app.command()
    def program(
        code: str | None = typer.Argument(None, help="The program (programCode); default: every program."),
        dispatched_days: int = typer.Option(
            14, "--dispatched-days", min=0, help="Kits dispatched longer ago than this and not registered need a person."),
        lab_days: int = typer.Option(
            7, "--lab-days", min=0, help="Kits registered longer ago than this and not at the lab need a person."),
        write: bool = typer.Option(True, "--write/--no-write", help="Write the page and its CSVs in the inbox."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """Where every order of a program is, how long each stage takes, what needs a person.

        Writes programs/<program>/index.html in the inbox (local folder or object store) with a
        CSV per list, and prints the counts."""
        from etl import warehouse
        from etl.program import page, report
        from etl.settings import Settings

        settings = Settings.from_env()
        engine = warehouse.connect(settings.warehouse_url)
        known = report.programs(engine)
        if code is not None and code not in known:
            typer.echo(f"labsync: no order of program {code!r} in the warehouse "
                       f"(programs: {', '.join(known) or 'none'})", err=True)
            raise typer.Exit(1)
        built = report.build(engine, code, dispatched_days=dispatched_days, lab_days=lab_days)
        written = {}
        if write:
            store = page.open_inbox(settings)
            written = {p.code: page.write_program(store, p) for p in built}
        if as_json:
            docs = [{**p.as_dict(), "page": written[p.code].page if p.code in written else None} for p in built]
            typer.echo(jsonout.dumps({"programs": docs}))
            raise typer.Exit(0)
        if not built:
            typer.echo("program: no orders in the warehouse yet")
        for p in built:
            stages = ", ".join(f"{report.STAGE_LABELS[s]} {n}" for s, n in p.stages.items() if n)
            typer.echo(f"{p.code}: {p.orders} orders, {p.items} kits: {stages or 'no kits known yet'}")
            for name, rows in p.lists.items():
                if rows:
                    title = report.LIST_TITLES[name].format(dispatched_days=p.dispatched_days, lab_days=p.lab_days)
                    typer.echo(f"  {title}: {len(rows)}")
            if p.code in written:
                typer.echo(f"  page: {written[p.code].page}")
        raise typer.Exit(0)
