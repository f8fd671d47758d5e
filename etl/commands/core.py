"""Foundation commands: `labsync db upgrade`, `labsync validate`, `labsync sandbox`."""

from __future__ import annotations

from pathlib import Path

import typer

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
    def sandbox(
        port: int = typer.Option(SANDBOX_PORT, help="Port on 127.0.0.1."),
        patients: int = typer.Option(50, help="Synthetic Rupa patients to seed."),
        lab_tests: int = typer.Option(20, help="Synthetic Rupa lab tests to seed."),
    ) -> None:
        """Serve the local LetsGetChecked and Rupa sandbox APIs on 127.0.0.1 until interrupted."""
        from etl.sandbox.server import Sandbox, serve

        sb = Sandbox.with_seed(patients=patients, lab_tests=lab_tests) if hasattr(Sandbox, "with_seed") else Sandbox()
        typer.echo(f"sandbox: LetsGetChecked at http://127.0.0.1:{port}/lgc, Rupa at http://127.0.0.1:{port}/rupa")
        serve(sb, port=port)
