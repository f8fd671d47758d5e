"""The names of the files labsync writes beside a batch file (no heavy imports: the inbox moves
them without loading the validation stack). Each takes a local `Path` or an inbox name as a
`PurePosixPath` and returns the same kind."""

from __future__ import annotations

from pathlib import PurePath
from typing import TypeVar

P = TypeVar("P", bound=PurePath)


def rejects_path_for(path: P) -> P:
    """`orders.csv` -> `orders.rejects.csv`, beside the file."""
    return path.with_name(f"{path.stem}.rejects.csv")


def fix_path_for(path: P) -> P:
    """`orders.csv` -> `orders.fix.csv`, beside the file: its rejected rows, to fix and drop back."""
    return path.with_name(f"{path.stem}.fix.csv")


def summary_path(path: P) -> P:
    """`orders.csv` -> `orders.summary.html`, beside the file."""
    return path.with_name(f"{path.stem}.summary.html")
