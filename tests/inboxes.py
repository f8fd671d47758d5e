"""A test's view of an inbox, the same on a local folder and on the S3 server: every look goes
through etl.intake.storage, so one test body checks both (`inbox_location` in conftest gives the URL)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from etl.intake.storage import Store, open_store
from tests.helpers import EXAMPLES, write_csv


class InboxView:
    def __init__(self, location: str) -> None:
        self.location = location
        self.store: Store = open_store(location).ensure()  # a folder a person would have made

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def drop(self, *names: str, folder: str = "") -> None:
        for name in names:
            self.put(EXAMPLES / name, f"{folder}/{name}" if folder else name)

    def put(self, local: Path, name: str) -> None:
        if self.store.has_folders and "/" in name:
            self.store.fs.makedirs(self.store.path(name.rsplit("/", 1)[0]), exist_ok=True)
        self.store.put(local, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "f"
            local.write_bytes(data)
            self.put(local, name)

    def write_csv(self, name: str, rows: list[dict], **kw) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.put(write_csv(Path(tmp) / "f.csv", rows, **kw), name)

    def names(self, folder: str = "") -> list[str]:
        """The files directly in `folder` (sub-folders left out), sorted."""
        return sorted(e.name for e in self.store.files(folder))

    def read(self, name: str) -> str:
        return self.store.read_text(name)

    def exists(self, name: str) -> bool:
        return self.store.exists(name)
