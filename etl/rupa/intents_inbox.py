"""Order-intents files in the inbox: their own subfolder, `inbox/intents/`.

    process_intents_inbox(engine, settings) -> [dict]     (the rupa_checkout DAG's `intents` task,
                                                           `labsync intents --inbox`)

Why a subfolder rather than recognising the header: a file is then never read against the wrong
contract, and the order-batch pipeline never sees these files (an intents file dropped among
the order batches is refused with a sentence saying where it belongs). Claims are atomic renames
into processing/, as the order-batch inbox does today; when the inbox moves its claims into the
warehouse (issue 8a) this module follows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from etl.batches import summary
from etl.batches.validate import rejects_path_for
from etl.errors import UnusableInputError
from etl.rupa.checkout_report import checkout_path_for, summary_path_for
from etl.rupa.client import open_client
from etl.rupa.intents import process_intents_file
from etl.settings import Settings
from etl.states import BatchStatus


@dataclass(frozen=True)
class IntentsInbox:
    """Order-intents files are dropped into their own subfolder of the inbox, so the order
    batch pipeline never sees them and no file is ever taken for the wrong contract:

        inbox/intents/              *.csv dropped here
        inbox/intents/processing/   claimed by an atomic rename (a crash's leftovers go first next run)
        inbox/intents/processed/    FILE.csv, FILE.rejects.csv, FILE.summary.html, FILE.checkout.csv
        inbox/intents/failed/       unusable files, with FILE.summary.html saying why
    """

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> IntentsInbox:
        return cls(Path(settings.inbox) / "intents")

    def folder(self, name: str) -> Path:
        return self.root / name

    def ensure(self) -> IntentsInbox:
        for d in (self.root, self.folder("processing"), self.folder("processed"), self.folder("failed")):
            d.mkdir(parents=True, exist_ok=True)
        return self


def _is_intents_file(p: Path) -> bool:
    return (p.is_file() and p.suffix.lower() == ".csv" and not p.name.startswith(".")
            and not p.name.endswith((".rejects.csv", ".checkout.csv")))


def _free_name(folder: Path, name: str) -> Path:
    target, n = folder / name, 2
    while target.exists():
        target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    return target


def _move_with_reports(path: Path, folder: Path) -> Path:
    target = _free_name(folder, path.name)
    for companion in (rejects_path_for(path), summary_path_for(path), checkout_path_for(path)):
        if companion.exists():
            companion.replace(folder / companion.name.replace(path.stem, target.stem, 1))
    path.replace(target)
    return target


def process_intents_inbox(engine: Engine, settings: Settings, *, settle_seconds: float | None = None,
                          owner: str | None = None) -> list[dict]:
    """Every intents file waiting in inbox/intents/ (and leftovers of a crashed run), once."""
    box = IntentsInbox.of(settings).ensure()
    settle = settings.inbox_settle_seconds if settle_seconds is None else settle_seconds
    processing = box.folder("processing")
    files = sorted(p for p in processing.iterdir() if _is_intents_file(p))
    now = time.time()
    for p in sorted((p for p in box.root.iterdir() if _is_intents_file(p) and now - p.stat().st_mtime >= settle),
                    key=lambda p: (p.stat().st_mtime, p.name)):
        target = _free_name(processing, p.name)
        try:
            p.rename(target)  # atomic: two runs cannot both claim it
        except FileNotFoundError:
            continue
        files.append(target)
    outcomes = []
    client = open_client(settings, engine) if files else None
    try:
        for path in files:
            try:
                result = process_intents_file(engine, settings, path, client=client, owner=owner)
            except UnusableInputError as exc:
                target = _move_with_reports(path, box.folder("failed"))
                summary.write(summary_path_for(target), summary.render(
                    file_name=target.name, title="Rupa order intents",
                    outcome="This file could not be used; nothing was sent.", counts={},
                    note=str(exc).replace(f"{path.name}: ", "", 1)))
                outcomes.append({"name": target.name, "batch_id": None, "status": BatchStatus.UNUSABLE,
                                 "error": str(exc)})
                continue
            target = _move_with_reports(path, box.folder("processed"))
            outcomes.append({**result.as_dict(), "name": target.name,
                             "summary_path": str(summary_path_for(target)),
                             "checkout_path": str(checkout_path_for(target))})
    finally:
        if client is not None:
            client.close()
    return outcomes
