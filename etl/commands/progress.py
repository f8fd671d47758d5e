"""The CLI's progress bars: one look for every command (description, bar, done/total, rate, time
spent, time left, and a free text such as counts per outcome).

Bars draw on the shared stderr console of `etl.logs`, which the CLI's log handler prints
through: a log line shows above a live bar, never cut into it. A bar is off with `--quiet`, when
stderr is not a terminal (a pipe, a file, a CI log), or when the caller says so.
"""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from etl import logs


class RateColumn(ProgressColumn):
    """`41.5 rows/s` (rich's own speed column speaks bytes): nothing until a rate is known."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        return Text(f"{speed:,.1f} {self.unit}/s" if speed < 100 else f"{speed:,.0f} {self.unit}/s")


def columns(unit: str) -> tuple[ProgressColumn, ...]:
    """The columns of every labsync bar. ETA shows once the total and a rate are known."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))


def enabled(wanted: bool = True) -> bool:
    """A bar draws only on a terminal, when wanted and not --quiet."""
    return wanted and logs.level() <= logs.NORMAL and logs.console().is_terminal


def bar(unit: str = "rows", *, show: bool = True, transient: bool = False) -> Progress:
    """A progress bar on the shared console. Add tasks with `note=""` (the free text column)."""
    return Progress(*columns(unit), console=logs.console(), disable=not enabled(show), transient=transient)
