"""Running labsync for real: migrations at deploy time (schema check, a locked upgrade), clear
configuration errors, the warehouse going away or filling up mid-load, Ctrl-C mid-load, leases
kept alive while a loader works, and `labsync retry` / `labsync status` for what is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.errors import ConfigError
from etl.orders.load import INTERRUPTED_ERROR, INTERRUPTED_INFLIGHT
from etl.settings import LgcSettings
from etl.warehouse import batch_files, lgc_orders
from tests.conftest import migrated
from tests.pgserver import PgServer, create_database, wait_for
from tests.test_lgc_support import (
    LABSYNC,
    cli_env,
    csv_row,
    fast,
    ledger,
    load_batch,
    order_row,
    outbox_rows,
    stage_rows,
    write_csv,
)

(HEAD,) = warehouse.SCHEMA_HEADS  # the one head the migrations lead to


def _lgc(sandbox):
    return sandbox.sandbox.lgc


# ---- migrations at deploy time -----------------------------------------------------------------

def test_schema_heads_constant_matches_the_migration_scripts():
    """Add a migration without updating SCHEMA_HEADS (or the other way round) and this fails."""
    assert warehouse.script_heads() == set(warehouse.SCHEMA_HEADS)


def test_connect_checks_the_revision_and_never_migrates_nor_imports_alembic(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    code = (
        "import sys\n"
        "from etl import warehouse\n"
        "from etl.errors import ConfigError\n"
        "try:\n    warehouse.connect(sys.argv[1])\n"
        "except ConfigError as exc:\n    print('ERR', exc)\n"
        "print('ALEMBIC', 'alembic' in sys.modules)\n"
    )

    def connect() -> str:
        done = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    empty = connect()
    assert f"the warehouse schema is at nothing (no labsync tables), labsync needs {HEAD}: " \
           "run `labsync db upgrade`" in empty
    assert "ALEMBIC False" in empty
    engine = warehouse.make_engine(url)
    with engine.begin() as conn:  # nothing was created by connect()
        assert sa.inspect(conn).get_table_names() == []
    warehouse.upgrade(engine, "0002_lgc")  # a warehouse left behind by an older labsync
    behind = connect()
    assert f"the warehouse schema is at 0002_lgc, labsync needs {HEAD}: run `labsync db upgrade`" in behind
    warehouse.upgrade(engine)
    assert "ERR" not in connect() and "ALEMBIC False" in connect()


def test_commands_say_to_upgrade_when_the_schema_is_behind(tmp_path, capsys, monkeypatch):
    from etl.cli import main

    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "run `labsync db upgrade`" in err and "Traceback" not in err
    assert main(["db", "upgrade"]) == 0
    assert f"current at {HEAD}" in capsys.readouterr().out
    assert main(["status"]) == 0


def test_two_upgrades_at_once_both_succeed(warehouse_url, tmp_path):
    fresh = (create_database(warehouse_url.rsplit("/", 1)[0] + "/postgres") if warehouse_url.startswith("postgresql")
             else f"sqlite:///{tmp_path / 'fresh.db'}")
    env = cli_env(fast(_settings(fresh)))
    procs = [subprocess.Popen([*LABSYNC, "db", "upgrade"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert f"current at {HEAD}" in out
    engine = warehouse.connect(fresh)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]


def _settings(url: str):
    from etl.settings import Settings
    from tests.conftest import TEST_FERNET_KEY

    return Settings(warehouse_url=url, fernet_key=TEST_FERNET_KEY)


@pytest.mark.postgres
def test_upgrade_waits_for_the_advisory_lock(pg_admin_url):
    url = create_database(pg_admin_url)
    holder = sa.create_engine(url)
    with holder.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": warehouse.MIGRATION_LOCK_KEY})
        upgrade = subprocess.Popen([*LABSYNC, "db", "upgrade"], env=cli_env(fast(_settings(url))),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def waiting() -> bool:
            with holder.connect() as other:
                return other.execute(sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar_one() == 1

        assert wait_for(waiting, timeout=120), upgrade.communicate()
        assert upgrade.poll() is None  # blocked on the lock, schema untouched
        assert warehouse.schema_heads(holder) is None
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": warehouse.MIGRATION_LOCK_KEY})
        out, err = upgrade.communicate(timeout=120)
    assert upgrade.returncode == 0, err
    assert warehouse.schema_heads(holder) == {HEAD}
    holder.dispose()


# ---- configuration -----------------------------------------------------------------------------

def test_sandbox_credentials_only_ever_for_loopback_urls():
    local = LgcSettings(base_url="http://127.0.0.1:8765/lgc").validated()
    assert local.client_id == "DEMO" and local.access_key and local.secret_key
    for url in ("https://api.letsgetchecked.example", "http://10.0.0.5/lgc", "http://localhost.evil.example/lgc"):
        with pytest.raises(ConfigError, match="LGC_"):
            LgcSettings(base_url=url).validated()


def test_heartbeat_must_be_shorter_than_the_lease():
    from etl.settings import Settings

    with pytest.raises(ConfigError, match="LABSYNC_HEARTBEAT_SECONDS"):
        Settings.from_env({"LABSYNC_LEASE_SECONDS": "10", "LABSYNC_HEARTBEAT_SECONDS": "10"}).checked()
    assert Settings.from_env({"LABSYNC_LEASE_SECONDS": "8"}).heartbeat_seconds == 2


# ---- leases kept alive -------------------------------------------------------------------------

def test_a_load_longer_than_its_lease_keeps_its_claims(engine, settings, sandbox):
    """Lease 1 s, renewed every 0.2 s; the load takes several seconds. Another task instance
    trying the same rows all along never finds one it may take."""
    from dataclasses import replace

    _lgc(sandbox).faults.update(latency=0.1)
    settings = replace(fast(settings, concurrency=1), lease_seconds=1.0, heartbeat_seconds=0.2)
    batch = stage_rows(engine, [order_row(i) for i in range(25)])
    done = threading.Event()
    rivals = []

    def rival() -> None:
        while not done.wait(0.2):
            rivals.append(load_batch(engine, settings, batch, owner="ti:order_batches/other/load/0"))

    first = threading.Thread(target=lambda: (load_batch(engine, settings, batch, owner="ti:order_batches/r/load/0"),
                                             done.set()))
    first.start()
    wait_for(lambda: sum(_lgc(sandbox).put_count.values()) >= 1, timeout=60)
    other = threading.Thread(target=rival)
    other.start()
    first.join(timeout=300)
    other.join(timeout=300)
    assert sum(r.sent for r in rivals) == 0 and len(rivals) >= 2
    assert set(_lgc(sandbox).put_count.values()) == {1} and len(_lgc(sandbox).orders) == 25


# ---- the warehouse going away, Ctrl-C ----------------------------------------------------------

def _start_load(path, env):
    return subprocess.Popen([*LABSYNC, "load", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rerun_until_done(path, env, tries: int = 15) -> subprocess.CompletedProcess:
    for _ in range(tries):
        done = subprocess.run([*LABSYNC, "load", str(path)], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return done
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        wait_for(lambda: False, timeout=0.5)  # a claim of the run that went away lapses
    return done


def _said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("labsync:")]


def _pg_settings(url: str, sandbox):
    from dataclasses import replace

    base = _settings(url)
    return replace(base, lgc=replace(base.lgc, base_url=sandbox.lgc_url))


def _loading(url: str, sandbox, tmp_path, n: int):
    """`labsync load` of n orders against a slow vendor, started and seen sending; returns
    (path, env, process). Short leases, so the reruns take over soon after it goes away."""
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.05)
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(n)])
    env = cli_env(fast(_pg_settings(url, sandbox), concurrency=2), LABSYNC_LEASE_SECONDS="2",
                  LABSYNC_HEARTBEAT_SECONDS="0.5")
    loader = _start_load(path, env)
    assert wait_for(lambda: sum(lgc.put_count.values()) >= 20, timeout=180)
    return path, env, loader


@pytest.mark.postgres
def test_the_warehouse_stopping_mid_load_exits_2_in_one_line_and_loses_nothing(sandbox, tmp_path):
    server = PgServer().start()
    try:
        url = migrated(create_database(server.admin_url))
        lgc, n = _lgc(sandbox), 200
        path, env, loader = _loading(url, sandbox, tmp_path, n)
        server.pause()
        out, err = loader.communicate(timeout=180)
        assert loader.returncode == 2, err
        assert "Traceback" not in err and "this is a bug" not in err
        (line,) = _said(err)
        assert "the warehouse is unavailable or refused a write" in line and "nothing is lost" in line
        server.resume()
        again = _rerun_until_done(path, env)
        assert again.returncode == 0, again.stderr
        engine = warehouse.connect(url)
        assert {r["outcome"] for r in outbox_rows(engine).values()} == {"accepted"}
        assert len(lgc.orders) == n and max(lgc.accepted_count.values()) == 1
        engine.dispose()
    finally:
        server.stop()


@pytest.mark.postgres
def test_the_warehouse_full_mid_load_exits_2_and_the_rows_go_out_later(pg_admin_url, sandbox, tmp_path):
    url = migrated(create_database(pg_admin_url))
    engine = warehouse.connect(url)
    lgc, n = _lgc(sandbox), 150
    path, env, loader = _loading(url, sandbox, tmp_path, n)
    with engine.begin() as conn:  # from now on every write of an outcome fails as on a full disk
        conn.execute(sa.text(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$"))
        conn.execute(sa.text("CREATE TRIGGER full_disk BEFORE UPDATE ON lgc_outbox FOR EACH ROW EXECUTE FUNCTION disk_full()"))
    out, err = loader.communicate(timeout=180)
    assert loader.returncode == 2, err
    (line,) = _said(err)
    assert "DiskFull" in line and "nothing is lost" in line and "Traceback" not in err
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER full_disk ON lgc_outbox"))
    again = _rerun_until_done(path, env)
    assert again.returncode == 0, again.stderr
    assert {r["outcome"] for r in outbox_rows(engine).values()} == {"accepted"}
    assert len(lgc.orders) == n and max(lgc.accepted_count.values()) == 1
    engine.dispose()


def test_ctrl_c_mid_load_exits_130_with_true_reasons_and_retry_sends_the_rest(engine, settings, sandbox, tmp_path,
                                                                               labsync):
    lgc = _lgc(sandbox)
    # slow enough that the load is still running when the signal lands, even on a starved
    # machine (at least 200 x 0.25 s / 4 = 12.5 s of sending)
    lgc.faults.update(latency=0.25)
    n = 200
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(n)])
    env = cli_env(fast(settings, concurrency=4))
    loader = _start_load(path, env)
    assert wait_for(lambda: sum(lgc.put_count.values()) >= 20, timeout=180)
    loader.send_signal(signal.SIGINT)
    out, err = loader.communicate(timeout=180)
    lgc.faults.update(latency=0)
    assert loader.returncode == 130, err
    (line,) = _said(err)
    assert line.startswith("labsync: interrupted") and "next run" in line and "Traceback" not in err
    rows = outbox_rows(engine)
    assert len(rows) == n
    left = {(r["outcome"], r["last_error"]) for r in rows.values() if r["outcome"] != "accepted"}
    assert ("failed", INTERRUPTED_ERROR) in left  # claimed, not sent: released with the true reason
    assert left <= {("failed", INTERRUPTED_ERROR), ("pending", INTERRUPTED_INFLIGHT),  # never "refused the
                    ("queued", None)}  # credentials"; rows the loader had not read yet are just queued
    assert all(r["claimed_by"] is None for r in ledger(engine).values())  # released at once
    with engine.connect() as conn:
        batch = conn.execute(sa.select(batch_files.c.status, batch_files.c.claimed_by)).one()
    assert tuple(batch) == ("incomplete", None)

    code, out, err = labsync("retry")
    assert code == 0, err
    assert "orders.csv (batch 1): loaded (accepted 200)" in out
    assert {r["outcome"] for r in outbox_rows(engine).values()} == {"accepted"}
    assert len(lgc.orders) == n and max(lgc.accepted_count.values()) == 1
    assert "nothing to send again" in labsync("retry")[1]


@pytest.fixture
def labsync(settings, monkeypatch, capsys):
    """Run `labsync ARGS` in this process (no interpreter start-up) against the test warehouse
    and sandbox; returns (exit code, stdout, stderr)."""
    from etl.cli import main

    def _run(*args: str, **extra: str):
        with monkeypatch.context() as m:
            for key, value in {**cli_env(fast(settings)), **extra}.items():
                if key.startswith(("LGC_", "LABSYNC_")):
                    m.setenv(key, value)
            code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_retry_gives_up_after_max_attempts_and_status_says_a_person_is_needed(engine, sandbox, tmp_path, labsync):
    lgc = _lgc(sandbox)
    lgc.forced["ORD-00001"] = 503
    path = write_csv(tmp_path / "orders.csv", [csv_row(i) for i in range(3)])
    three = {"LABSYNC_MAX_ATTEMPTS": "3"}

    assert labsync("load", str(path), **three)[0] == 1  # attempt 1
    assert labsync("retry", **three)[0] == 1  # attempt 2
    code, out, _ = labsync("retry", **three)  # attempt 3, the last
    assert code == 1 and "given_up 1" in out
    assert labsync("retry", **three)[1].startswith("retry: nothing to send again")
    sends = lgc.put_count["ORD-00001"]
    assert "needs a person: 1 rows given up after 3 attempts" in labsync("status", **three)[1]
    rows = json.loads(labsync("status", "--batch", "orders.csv", "--json")[1])
    (given_up,) = [r for r in rows if r["state"] == "given_up"]
    assert given_up["client_order_id"] == "ORD-00001" and given_up["attempts"] == 3
    assert "503" in given_up["last_error"]
    assert lgc.put_count["ORD-00001"] == sends  # later runs leave it alone

    lgc.forced.clear()  # a person fixed the cause
    code, out, _ = labsync("retry", "--given-up", **three)
    assert code == 0 and "loaded (accepted 3)" in out
    with engine.connect() as conn:
        assert conn.execute(sa.select(lgc_orders.c.state).where(
            lgc_orders.c.client_order_id == "ORD-00001")).scalar_one() == "accepted"
