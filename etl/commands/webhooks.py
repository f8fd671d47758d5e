"""`labsync webhooks serve`: the webhook receiver in the foreground (etl.webhooks)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    webhooks = typer.Typer(help="Receive vendor events (webhooks) into the warehouse.",
                           no_args_is_help=True)

    @webhooks.command("serve")
    def serve(
        host: str = typer.Option(None, help="Interface to bind (default LABSYNC_WEBHOOK_HOST or 127.0.0.1)."),
        port: int = typer.Option(None, help="Port (default LABSYNC_WEBHOOK_PORT or 8900)."),
    ) -> None:
        """Serve POST /webhooks/lgc and /webhooks/rupa, /healthz and /readyz until interrupted.
        Events are stored raw in webhook_events; the lgc_lifecycle and rupa_events tasks apply them."""
        from dataclasses import replace

        from etl import asgi, warehouse
        from etl.settings import Settings
        from etl.webhooks.app import build_app

        settings = Settings.from_env()
        hooks = replace(settings.webhooks, host=host or settings.webhooks.host,
                        port=port or settings.webhooks.port).validated()
        engine = warehouse.connect(settings.warehouse_url)
        from etl import logs

        logs.serving()
        signed = [name for name, on in (("lgc", hooks.lgc_key), ("rupa", hooks.rupa_secret)) if on]
        typer.echo(f"webhooks: listening on http://{hooks.host}:{hooks.port}/webhooks/{{lgc,rupa}} "
                   f"(signatures checked: {', '.join(signed) or 'none'})")
        asgi.serve(build_app(engine, hooks), host=hooks.host, port=hooks.port)

    app.add_typer(webhooks, name="webhooks")
