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
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: typer's rich one imports rich's markdown, syntax and traceback
    # modules (~60 ms, most of `labsync --help`); `_tidy` keeps whole first sentences in the
    # command lists. Rich stays for the commands' tables and progress bars.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        from etl import __version__

        typer.echo(f"labsync {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only on stderr; no progress bars."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False, help="Log what each step did (-v), and "
                                "every order and page too (-vv). By default only warnings and errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Validate CSV order batches, load them into LetsGetChecked, extract Rupa Health data.

    Exit codes: 0 everything went through, 1 some rows were rejected or failed, 2 unusable input
    or configuration (a wrong URL or setting, credentials refused), 130 interrupted, 3 a bug.
    Log lines go to stderr, results to stdout."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose do not go together", param_hint="--quiet")
    logs.configure(logs.QUIET if quiet else logs.DEBUG if verbose > 1 else logs.VERBOSE if verbose else logs.NORMAL)


def _register() -> None:
    from etl.commands import alerts as alert_commands
    from etl.commands import audit, budget, core, intents, lgc, lifecycle, program, rupa, webhooks
    from etl.commands import observations as observation_commands

    for module in (core, lgc, lifecycle, rupa, webhooks, budget, intents, audit, program, alert_commands,
                   observation_commands):
        module.register(app)


_register()


def _paragraphs(text: str | None) -> str | None:
    """Help text as written in a docstring, with its single line breaks joined: the terminal
    wraps it at its own width, never mid-sentence at the width of our source code. A paragraph
    whose lines are indented (a table, a list of commands) keeps its breaks (click's \\b)."""
    if not text:
        return text
    import inspect

    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        if len(lines) > 1 and any(line.startswith(" ") for line in lines):
            out.append("\b\n" + para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _metavar(param) -> str:
    """`FILE`, `N`, `NAME`: what a person types, instead of typer's `<path>`, `<int>`, `<str>`."""
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.20 (its own click); else click's type
    choices = desc.choices if desc is not None else getattr(param.type, "choices", None)
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    is_path = desc.is_path if desc is not None else type(param.type).__name__ == "Path"
    if is_path:
        return "FILE" if param.param_type_name == "argument" else "PATH"
    kind = desc.annotation if desc is not None else None
    if kind in (int, float) or type(getattr(param, "type", None)).__name__ in ("IntParamType", "FloatParamType"):
        return "N"
    return (param.name or "value").upper()


def _plain_argument(param) -> None:
    """An argument shows as `FILE` (or `[NAME]` when optional), without typer's type column and
    its `{FILE}` usage braces."""
    name = param.metavar
    param.display_type_rich = lambda ctx: None
    param._usage_display_name = lambda: (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")


def _tidy(command) -> None:
    """Readable help for every command: paragraphs joined, no `<bool>` after flags, metavars in
    capitals (the `metavar=` a parameter names itself wins)."""
    command.help = _paragraphs(command.help)
    command.rich_markup_mode = None  # sub-apps (`db`, `rupa`, `webhooks`) too: see `app` above
    if command.help and not command.short_help:  # a list shows the first paragraph whole, not cut at 45 chars
        command.short_help = command.help.split("\n\n", 1)[0].removeprefix("\b\n")
    made = command.get_help_option  # -h/--help is made when a context asks for it: a flag too

    def get_help_option(ctx, made=made):
        option = made(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for param in command.params:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _metavar(param)
        if param.param_type_name == "argument":
            _plain_argument(param)
        if getattr(param, "help", None):
            param.help = _paragraphs(param.help)
    for sub in (getattr(command, "commands", None) or {}).values():
        _tidy(sub)


def command():
    """The click command behind `labsync`, with its help tidied (built once per process)."""
    global _command
    if _command is None:
        _command = typer.main.get_command(app)
        _tidy(_command)
    return _command


_command = None


def _warehouse_error(exc: BaseException):
    if "sqlalchemy" not in sys.modules:  # nothing touched the warehouse
        return None
    from etl.warehouse import as_unavailable

    return as_unavailable(exc)


def main(argv: list[str] | None = None) -> int:
    import etl.airflow.storage  # noqa: F401  (an inbox connection id goes through Airflow, when installed)

    with logs.cli_session():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    logs.configure(logs.NORMAL)  # the -q/-v options change it before a command runs
    try:
        # standalone mode: typer prints usage errors (exit 2) and handles Ctrl-C (exit 1) itself;
        # commands end with `raise typer.Exit(code)`.
        command()(args=argv, prog_name="labsync")
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
