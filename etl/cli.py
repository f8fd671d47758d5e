"""The `labsync` command. Each area registers its subcommands from `etl/commands/`; this module
only builds the app and turns outcomes into exit codes:

    0  everything went through        1  some rows were rejected or failed
    2  unusable input or configuration, or the warehouse went away (nothing is lost)
    3  a bug (a one-line message; LABSYNC_DEBUG=1 for the traceback)
    130 interrupted (Ctrl-C): claimed rows released with that reason
"""

from __future__ import annotations

import os
import sys

import typer

from etl import logs
from etl.errors import LabsyncError

app = typer.Typer(
    name="labsync",
    help="Validate CSV order batches, load them into LetsGetChecked, extract Rupa Health data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from etl.commands import budget, core, intents, lgc, lifecycle, rupa, webhooks

    for module in (core, lgc, lifecycle, rupa, webhooks, budget, intents):
        module.register(app)


_register()


def _warehouse_error(exc: BaseException):
    if "sqlalchemy" not in sys.modules:  # nothing touched the warehouse
        return None
    from etl.warehouse import as_unavailable

    return as_unavailable(exc)


def main(argv: list[str] | None = None) -> int:
    logs.configure()
    try:
        # standalone mode: typer prints usage errors (exit 2) and handles Ctrl-C (exit 1) itself;
        # commands end with `raise typer.Exit(code)`.
        app(args=argv, prog_name="labsync")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except LabsyncError as exc:
        print(f"labsync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("labsync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line, no traceback (and no PHI) for the user
        plain = _warehouse_error(exc)
        if plain is not None:  # the warehouse went away or refused a write: not a bug
            print(f"labsync: {plain}", file=sys.stderr)
            return plain.exit_code
        if os.environ.get("LABSYNC_DEBUG"):
            raise
        print(
            f"labsync: unexpected error ({type(exc).__name__}); this is a bug. "
            "Rerun with LABSYNC_DEBUG=1 to see the traceback.",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
