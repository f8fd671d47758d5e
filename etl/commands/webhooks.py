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
        allow_unauthenticated: bool = typer.Option(
            False, "--allow-unauthenticated",
            help="Listen on a non-loopback address even though a vendor's deliveries are not "
                 "authenticated (no LGC_WEBHOOK_KEY; no RUPA_WEBHOOK_SECRET or RUPA_WEBHOOK_PATH). A warning is logged at every start."),
    ) -> None:
        """Serve POST /webhooks/lgc and /webhooks/rupa, /healthz and /readyz until interrupted.
        Events are stored raw in webhook_events; the lgc_lifecycle and rupa_events tasks apply them.

        Fails closed: on an address other than loopback it starts only when every vendor's
        deliveries are authenticated (LGC_WEBHOOK_KEY; RUPA_WEBHOOK_SECRET or RUPA_WEBHOOK_PATH), else exit 2 naming
        what is missing, unless --allow-unauthenticated says it is deliberate."""
        from dataclasses import replace

        from etl import asgi, warehouse
        from etl.settings import Settings
        from etl.webhooks.app import build_app

        settings = Settings.from_env()
        hooks = replace(settings.webhooks, host=host or settings.webhooks.host,
                        port=port or settings.webhooks.port).validated()
        from etl.settings import is_loopback_host

        unauthenticated = unauthenticated_sources(hooks)
        if unauthenticated and not is_loopback_host(hooks.host):
            if not allow_unauthenticated:
                from etl.errors import ConfigError

                raise ConfigError(
                    f"refusing to listen on {hooks.host}: anyone who can reach it could post "
                    f"{' and '.join(name for name, _ in unauthenticated)} events unauthenticated; set "
                    f"{' and '.join(setting for _, setting in unauthenticated)}, listen on 127.0.0.1 "
                    "behind your own gateway, or pass --allow-unauthenticated to accept it deliberately")
            import logging

            logging.getLogger("etl.webhooks").warning(
                "webhooks: listening on %s with unauthenticated deliveries accepted from %s "
                "(--allow-unauthenticated)", hooks.host, ", ".join(name for name, _ in unauthenticated))
        engine = warehouse.connect(settings.warehouse_url)
        from etl import logs

        logs.serving()
        signed = [name for name, on in (("lgc", hooks.lgc_key), ("rupa", hooks.rupa_secret)) if on]
        rupa_path = "/webhooks/rupa/<RUPA_WEBHOOK_PATH>" if hooks.rupa_path_secret else "/webhooks/rupa"
        typer.echo(f"webhooks: listening on http://{hooks.host}:{hooks.port}: /webhooks/lgc, {rupa_path} "
                   f"(signatures checked: {', '.join(signed) or 'none'}"
                   f"{'; Rupa by capability path' if hooks.rupa_path_secret else ''})")
        limits = asgi.Limits(max_connections=hooks.max_connections, head_timeout=hooks.head_timeout)
        asgi.serve(build_app(engine, hooks, body_timeout=hooks.body_timeout, limits=limits,
                             fernet_key=settings.fernet_key),
                   host=hooks.host, port=hooks.port)

    app.add_typer(webhooks, name="webhooks")


def unauthenticated_sources(hooks) -> list[tuple[str, str]]:
    """(vendor, the setting that would authenticate it) for each source whose deliveries are
    accepted without a signature."""
    return [(vendor, setting) for vendor, setting, key in (
        ("LetsGetChecked", "LGC_WEBHOOK_KEY", hooks.lgc_key),
        ("Rupa", "RUPA_WEBHOOK_SECRET or RUPA_WEBHOOK_PATH", hooks.rupa_secret or hooks.rupa_path_secret))
        if not key]
