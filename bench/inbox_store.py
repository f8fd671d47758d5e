"""What an object-store inbox costs against a local folder: `prepare` (claim by content hash,
a temporary copy, whole-file validation into the outbox, the reject report put beside the file)
then `finish` (summary, the copy-then-delete move), on generated batches (1 % of rows broken),
with the inbox on a local folder and on a bucket of moto's S3-compatible server on loopback
(tests/s3server.py), in one run. Nothing is sent (the rows stay queued in the outbox).

    .venv/bin/python bench/inbox_store.py [--rows 20000] [--files 3] [--repeat 3]

Goal: the S3 inbox within 1.5x the local one (loopback: the extra is the copies and requests,
not the network). Each time is the median of `--repeat` runs. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.validate import generate  # noqa: E402


def one_run(location: str, files: list[Path], tmp: Path, n: int) -> float:
    from etl import warehouse
    from etl.orders import inbox
    from etl.settings import Settings
    from tests.conftest import TEST_FERNET_KEY, migrated
    from tests.inboxes import InboxView

    url = migrated(f"sqlite:///{tmp / f'w{n}.db'}")
    settings = replace(Settings(), warehouse_url=url, inbox=location, inbox_settle_seconds=0.0,
                       fernet_key=TEST_FERNET_KEY)
    view = InboxView(location)
    for i, f in enumerate(files):
        view.put(f, f"batch{i}.csv")
    engine = warehouse.connect(url)
    t0 = time.perf_counter()
    prepared = inbox.prepare(engine, settings, owner=f"cli:bench-{n}")
    outcomes = inbox.finish(engine, settings, prepared, owner=f"cli:bench-{n}")
    took = time.perf_counter() - t0
    assert len(outcomes) == len(files) and len(view.names("processed")) >= 2 * len(files), outcomes
    engine.dispose()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import logging

    logging.disable(logging.INFO)
    from tests.s3server import S3Server

    server = S3Server().start()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            files = []
            for i in range(args.files):
                files.append(tmp / f"src{i}.csv")
                generate(files[-1], args.rows + i)  # distinct contents: distinct batches
            size = sum(f.stat().st_size for f in files) / 1e6
            times: dict[str, list[float]] = {"local": [], "s3": []}
            n = 0
            for _ in range(args.repeat):
                for kind in ("local", "s3"):
                    n += 1
                    location = str(tmp / f"inbox{n}") if kind == "local" else server.new_inbox()
                    times[kind].append(one_run(location, files, tmp, n))
            local, s3 = statistics.median(times["local"]), statistics.median(times["s3"])
            print(f"inbox prepare+finish, {args.files} files x {args.rows} rows ({size:.1f} MB), "
                  f"median of {args.repeat}:")
            print(f"  local folder        {local:7.2f} s")
            print(f"  s3 (moto, loopback) {s3:7.2f} s   {s3 / local:.2f}x local (goal <= 1.5x)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
