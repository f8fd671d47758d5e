"""The inbox on object storage, where nothing renames atomically: a move is a copy then a
delete, and a run that dies between the two (or just after) must neither lose a batch nor leave
it twice; the store is reached with the standard AWS variables or through an Airflow
Connection (ObjectStoragePath); a bad location is one plain sentence. Against the real S3
server of tests/s3server.py and a local folder alike."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.cli import main
from etl.intake import storage
from etl.orders import inbox
from etl.warehouse import batch_files
from tests.helpers import REPO
from tests.inboxes import InboxView
from tests.test_inbox import OWNER, lapse_every_claim, run

DEAD = "run:order_batches/died-mid-move"


class Died(BaseException):
    """The worker process ends here (a BaseException: nothing of ours catches it)."""


@dataclasses.dataclass(frozen=True)
class DiesAtDelete(storage.Store):
    """The real store, whose process dies just before (`after=False`) or just after deleting
    the batch file from the inbox: the two halves of a move on a store that cannot rename."""

    victim: str = "orders.csv"
    after: bool = False

    def delete(self, relative: str) -> bool:
        if relative != self.victim:
            return super().delete(relative)
        if not self.after:
            raise Died(relative)
        super().delete(relative)
        raise Died(relative)


@pytest.fixture
def box(settings, inbox_location):
    settings = replace(settings, inbox=inbox_location, inbox_settle_seconds=0.0, chunk_rows=100)
    inbox.open_inbox(settings)
    return settings, InboxView(inbox_location), warehouse.connect(settings.warehouse_url)


def die_while_moving(monkeypatch, settings, engine, *, after: bool) -> None:
    """A whole run (prepare, load, finish) whose process dies inside finish's move."""
    real = inbox.open_inbox(settings)
    dying = DiesAtDelete(real.fs, real.root, real.url, after=after)
    prepared = inbox.prepare(engine, settings, owner=DEAD)
    inbox.load_chunk(engine, settings, prepared["chunks"][0], owner=DEAD, file_owner=DEAD)
    with monkeypatch.context() as m:
        m.setattr(inbox, "open_inbox", lambda _settings: dying)
        with pytest.raises(Died):
            inbox.finish(engine, settings, prepared, owner=DEAD)


def stored(engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(batch_files.c.stored_as, batch_files.c.moving_from,
                                           batch_files.c.moving_to, batch_files.c.claimed_by)).mappings().one())


def test_a_run_that_died_between_copy_and_delete_leaves_one_copy_and_sends_nothing_twice(box, sandbox, monkeypatch):
    settings, paths, engine = box
    paths.drop("orders.csv")
    die_while_moving(monkeypatch, settings, engine, after=False)
    # both halves are there: the copy in processed/, the original still in the inbox
    assert paths.names() == ["orders.csv"] and "orders.csv" in paths.names("processed")
    assert stored(engine)["moving_to"] == "processed/orders.csv"

    assert run(engine, settings, owner=OWNER) == []  # the dead run's claim is still live: left alone
    lapse_every_claim(engine)
    (outcome,) = run(engine, settings, owner=OWNER)
    assert outcome["status"] == "loaded" and outcome["counts"]["accepted"] == 10
    assert paths.names() == [] and paths.names("processed") == ["orders.csv", "orders.summary.html"]
    assert "All 10 rows went through" in paths.read("processed/orders.summary.html")
    assert stored(engine) == {"stored_as": "processed/orders.csv", "moving_from": None, "moving_to": None,
                              "claimed_by": None}
    assert len(sandbox.sandbox.lgc.orders) == 10 and set(sandbox.sandbox.lgc.put_count.values()) == {1}
    assert run(engine, settings, owner=OWNER) == []


def test_a_run_that_died_just_after_the_delete_gets_its_file_recorded_and_summarised(box, sandbox, monkeypatch):
    settings, paths, engine = box
    paths.drop("orders.csv")
    die_while_moving(monkeypatch, settings, engine, after=True)
    assert paths.names() == [] and paths.names("processed") == ["orders.csv"]  # moved; nothing recorded yet
    assert stored(engine)["stored_as"] is None

    lapse_every_claim(engine)
    assert run(engine, settings, owner=OWNER) == []
    assert stored(engine) == {"stored_as": "processed/orders.csv", "moving_from": None, "moving_to": None,
                              "claimed_by": None}
    assert paths.names("processed") == ["orders.csv", "orders.summary.html"]
    assert "All 10 rows went through" in paths.read("processed/orders.summary.html")
    assert set(sandbox.sandbox.lgc.put_count.values()) == {1}


def test_an_unusable_file_whose_move_was_interrupted_lands_once_in_failed(box, sandbox, monkeypatch):
    settings, paths, engine = box
    paths.drop("orders_unusable.csv")
    real = inbox.open_inbox(settings)
    with monkeypatch.context() as m:
        m.setattr(inbox, "open_inbox", lambda _s: DiesAtDelete(real.fs, real.root, real.url,
                                                               victim="orders_unusable.csv"))
        with pytest.raises(Died):
            inbox.prepare(engine, settings, owner=DEAD)
    lapse_every_claim(engine)
    (outcome,) = run(engine, settings, owner=OWNER)
    assert outcome["status"] == "unusable"
    assert paths.names() == [] and paths.names("failed") == ["orders_unusable.csv", "orders_unusable.summary.html"]


def test_the_aws_variables_reach_the_s3_server_and_a_missing_bucket_is_one_sentence(s3_server, lite_settings,
                                                                                    monkeypatch, capsys):
    import os

    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url  # what the recipe in the README sets
    store = storage.open_store(s3_server.new_inbox())
    assert store.fs.protocol[0] == "s3" and store.ensure().files() == []
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", lite_settings.warehouse_url)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", lite_settings.fernet_key)
    assert main(["inbox", "--folder", "s3://no-such-bucket-here/inbox"]) == 2
    err = capsys.readouterr().err
    assert "no-such-bucket-here" in err and "does not exist" in err and "Traceback" not in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # moto checks nothing; a closed port is a refusal
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageUnavailable, match="could not be reached"):
        storage.open_store("s3://labsync-tests/x").ensure()


def test_a_password_in_the_url_is_never_shown():
    assert storage.display("sftp://pm:hunter2@files.example/inbox") == "sftp://pm:***@files.example/inbox"
    assert storage.display("s3://bucket/inbox") == "s3://bucket/inbox"


AIRFLOW_PROBE = r"""
import json, sys
import s3fs
from airflow.sdk.io import attach
import etl.airflow.storage  # the CLI and the DAG tasks import it: connection ids work
from etl.intake import storage
endpoint, url = sys.argv[1], sys.argv[2]
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
attach(protocol="s3", conn_id="labsync_inbox_test", fs=fs)
store = storage.open_store(url.replace("s3://", "s3://labsync_inbox_test@"))
by_setting = storage.open_store(url, conn_id="labsync_inbox_test")
store.ensure().write_text("hello.txt", "hi")
try:
    storage.open_store("gs://labsync_inbox_test@bucket/inbox")
    refused = ""
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
print("PROBE" + json.dumps({"same_fs": store.fs is fs and by_setting.fs is fs, "root": store.root,
                            "refused": refused}))
"""


def test_a_connection_id_goes_through_airflow_object_storage(s3_server, tmp_path):
    """`s3://CONN@bucket/prefix` (ObjectStoragePath's syntax) or LABSYNC_INBOX_CONN_ID: the
    filesystem is the one Airflow gives for that connection. Here the connection's filesystem is
    attached the way Airflow lets a deployment attach one (airflow.sdk.io.attach), an s3fs on the
    test server; a deployment gets it from apache-airflow-providers-amazon and the Connection.
    In a subprocess, as a task would be: importing Airflow configures logging process-wide."""
    import importlib.util

    assert importlib.util.find_spec("airflow") is not None, "the dev extra installs apache-airflow"
    url = s3_server.new_inbox()
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", AIRFLOW_PROBE, s3_server.endpoint_url, url], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.split("PROBE", 1)[1])
    assert facts["same_fs"] and facts["root"] == url.removeprefix("s3://")
    assert "ConfigError" in facts["refused"] and "no filesystem for gs://" in facts["refused"]
    assert InboxView(url).read("hello.txt") == "hi"  # the same object, seen without Airflow
