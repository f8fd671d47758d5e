"""The CLI behaves like the tools data teams like: --version, -h, --quiet/--verbose, plain log
lines above the progress bar, errors that name the URL and setting at fault (exit 2), times in
every --json, readable help, and `labsync doctor` on a good and on a broken configuration.

In-process runs (`cli.main`) against the sandbox and a SQLite warehouse where stdout/stderr are
enough; real `labsync` processes where the log lines themselves are checked (pytest owns the
root logger in-process)."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
from datetime import datetime

import pytest

from etl import cli, logs
from tests.helpers import EXAMPLES
from tests.rupa_support import authorize
from tests.test_lgc_support import LABSYNC, cli_env, fast

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _free_port() -> int:
    """A loopback port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(lite_settings, monkeypatch):
    """The process environment of a user whose settings point at the sandbox and a SQLite
    warehouse; returns it as a dict for subprocesses too."""
    values = cli_env(fast(lite_settings, concurrency=2), RUPA_BASE_URL=lite_settings.rupa.base_url,
                     LABSYNC_INBOX=str(lite_settings.inbox), LABSYNC_INBOX_SETTLE_SECONDS="0")
    for key in list(__import__("os").environ):
        if key.startswith(("LGC_", "LABSYNC_", "RUPA_")):
            monkeypatch.delenv(key)
    for key, value in values.items():
        if key.startswith(("LGC_", "LABSYNC_", "RUPA_")):
            monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def run(capsys):
    def _run(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


# ---- --version, -h, help text -------------------------------------------------------------------
def test_version_and_short_help(run):
    from etl import __version__

    assert run("--version") == (0, f"labsync {__version__}\n", "")
    code, out, _ = run("-h")
    assert code == 0 and "Usage: labsync" in out and "--quiet" in out and "--verbose" in out and "doctor" in out
    code, out, _ = run("load", "-h")
    assert code == 0 and "Usage: labsync load [OPTIONS] FILE" in out


def test_help_has_readable_metavars_and_whole_sentences(run):
    """No `<bool>` after flags and no typer type tags; every docstring paragraph is one line in
    the command's help (the terminal wraps it, not our source code's line breaks)."""
    for args in (["-h"], ["validate", "-h"], ["status", "-h"], ["extract", "-h"], ["track", "-h"],
                 ["lifecycle", "-h"], ["db", "-h"], ["doctor", "-h"]):
        code, out, _ = run(*args)
        assert code == 0, args
        for tag in ("<bool>", "<str>", "<int>", "<path>", "<float>", "{file}"):
            assert tag not in out, (args, tag)
    code, out, _ = run("status", "-h")
    assert re.search(r"--batch\s+BATCH", out) and re.search(r"--limit\s+N\b", out)

    def walk(command, path=()):
        yield path, command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from walk(sub, (*path, name))

    for path, command in walk(cli.command()):
        for paragraph in (command.help or "").split("\n\n"):
            assert paragraph.startswith("\b") or "\n" not in paragraph, (path, paragraph)
    lifecycle = cli.command().commands["lifecycle"].help
    assert "apply stored webhook events (each order confirmed with a GET)" in lifecycle


# ---- configuration errors exit 2 and name what is wrong ------------------------------------------
def test_a_wrong_url_exits_2_naming_the_url_and_the_setting(env, run, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("LGC_BASE_URL", f"{dead}/lgc")
    monkeypatch.setenv("RUPA_BASE_URL", f"{dead}/rupa")
    monkeypatch.setenv("RUPA_API_TOKEN", "sandboxtoken")
    batch = tmp_path / "orders.csv"
    batch.write_bytes((EXAMPLES / "orders.csv").read_bytes())
    expected_lgc = f"could not reach LetsGetChecked at {dead}/lgc: connection refused (LGC_BASE_URL)"
    for args in (["load", str(batch)], ["track", "1234567"]):
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert expected_lgc in err and "Traceback" not in err and "ConnectError" not in err
    code, _, err = run("extract", "--no-progress")
    assert code == 2 and f"could not reach Rupa at {dead}/rupa: connection refused (RUPA_BASE_URL)" in err


def test_a_host_that_does_not_resolve_says_so(env, run, tmp_path, monkeypatch):
    monkeypatch.setenv("LGC_BASE_URL", "https://no-such-host.invalid/lgc")
    monkeypatch.setenv("LGC_CLIENT_ID", "DEMO")
    monkeypatch.setenv("LGC_ACCESS_KEY", "a" * 25)
    monkeypatch.setenv("LGC_SECRET_KEY", "b" * 25)
    code, _, err = run("track", "1234567")
    assert code == 2
    assert "could not reach LetsGetChecked at https://no-such-host.invalid/lgc: host not found (LGC_BASE_URL)" in err
    assert "a" * 25 not in err and "b" * 25 not in err


@pytest.mark.parametrize("name,value,words", [
    ("LABSYNC_CHUNK_ROWS", "lots", "LABSYNC_CHUNK_ROWS must be a number"),
    ("LGC_BASE_URL", "ftp://example.org/lgc", "LGC_BASE_URL must be an http(s) URL"),
    ("LABSYNC_WAREHOUSE_URL", "sqlite:///{tmp}/never-upgraded.db", "run `labsync db upgrade`"),
])
def test_configuration_errors_exit_2_in_one_line(env, run, tmp_path, monkeypatch, name, value, words):
    monkeypatch.setenv(name, value.format(tmp=tmp_path))
    code, out, err = run("load", str(EXAMPLES / "orders.csv"))
    assert code == 2 and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- times in every --json -------------------------------------------------------------------------
def test_every_json_output_carries_iso_utc_times(env, run, tmp_path, sandbox):
    batch = tmp_path / "orders.csv"
    batch.write_bytes((EXAMPLES / "orders.csv").read_bytes())
    assert run("load", str(batch))[0] == 0
    _, out, _ = run("batches", "--json")
    (row,) = json.loads(out)
    assert ISO_UTC.match(row["received_at"]) and ISO_UTC.match(row["processed_at"])
    _, out, _ = run("status", "1234567", "--json")
    assert ISO_UTC.match(json.loads(out)["updated_at"])
    for args in (["status", "--json"], ["budget", "--json"], ["track", "--json"], ["results", "--json"],
                 ["doctor", "--json"]):
        code, out, err = run(*args)
        at = json.loads(out)["at"]
        assert ISO_UTC.match(at), (args, at)
        assert abs((datetime.fromisoformat(at.replace("Z", "+00:00")) - datetime.now().astimezone()).total_seconds()) < 300


# ---- log lines: plain, above the progress bar, quiet and verbose -------------------------------------
def _labsync(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LABSYNC, *args], env=env, capture_output=True, text=True, timeout=120)


def test_quiet_default_and_verbose_log_lines(env, lite_settings):
    box = lite_settings.inbox
    box.mkdir(parents=True)
    (box / "notes.txt").write_text("not a batch")
    (box / "orders.csv").write_bytes((EXAMPLES / "orders.csv").read_bytes())
    done = _labsync(env, "inbox")
    assert done.returncode == 0, done.stderr
    assert "orders.csv: loaded (accepted 10)" in done.stdout
    lines = done.stderr.strip().splitlines()
    # by default: warnings only, one plain line each (time, level, message; no logger path)
    assert len(lines) == 1 and re.match(r"^\d\d:\d\d:\d\d warning +inbox: left notes\.txt where it is", lines[0])
    assert "etl." not in done.stderr

    (box / "more.csv").write_bytes((EXAMPLES / "orders_broken.csv").read_bytes())
    quiet = _labsync(env, "-q", "inbox")
    assert quiet.returncode == 1 and "more.csv: loaded" in quiet.stdout
    assert quiet.stderr == ""  # the warning about notes.txt is not an error

    (box / "again.csv").write_bytes((EXAMPLES / "orders_broken.csv").read_bytes().replace(b"BROKEN-", b"AGAIN-"))
    verbose = _labsync(env, "-v", "inbox")
    assert verbose.returncode == 1
    assert re.search(r"^\d\d:\d\d:\d\d info +inbox: batch \d+ loaded, accepted 2, rejected before sending 6$",
                     verbose.stderr, re.M), verbose.stderr
    assert "{" not in verbose.stderr and "'accepted'" not in verbose.stderr  # no dict reprs
    assert "debug" not in verbose.stderr
    assert _labsync(env, "-q", "-v", "inbox").returncode == 2


def test_log_lines_print_above_a_live_progress_bar(monkeypatch):
    """On a terminal, a record logged while a bar is live comes out whole, on its own line,
    before the bar's last frame (rich's console prints above its live display)."""
    from rich.console import Console

    from etl.commands import progress

    screen = io.StringIO()
    term = Console(file=screen, force_terminal=True, width=120, color_system=None, stderr=True)
    monkeypatch.setattr(logs, "_console", term)
    monkeypatch.setattr(logs, "_level", logs.NORMAL)
    handler = logs.ConsoleHandler()
    handler.setFormatter(logs.PlainFormatter())
    log = logging.getLogger("etl.test_cli_manners")
    log.addHandler(handler)
    try:
        with progress.bar("orders") as bar:
            task = bar.add_task("loading orders.csv", total=4, note="")
            for i in range(4):
                bar.update(task, advance=1, note=f"accepted {i + 1}")
                if i == 1:
                    log.warning("order %s (batch %s, line %s): no answer; sent again next run", "ORD-1", 3, 4)
                    bar.refresh()
    finally:
        log.removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # cursor moves and styles
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    logged = [line for line in lines if "no answer; sent again next run" in line]
    assert len(logged) == 1, lines
    assert re.match(r"^\d\d:\d\d:\d\d warning +order ORD-1 \(batch 3, line 4\): no answer; sent again next run$",
                    logged[0])
    last = lines[-1]
    assert "loading orders.csv" in last and "4/4" in last and "orders/s" in last and "accepted 4" in last
    assert lines.index(logged[0]) < len(lines) - 1


def test_progress_bars_are_off_when_quiet_or_not_a_terminal(monkeypatch):
    from rich.console import Console

    from etl.commands import progress

    monkeypatch.setattr(logs, "_console", Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setattr(logs, "_level", logs.NORMAL)
    assert progress.enabled() and not progress.enabled(False)
    monkeypatch.setattr(logs, "_level", logs.QUIET)
    assert not progress.enabled()
    monkeypatch.setattr(logs, "_console", Console(file=io.StringIO(), force_terminal=False))
    monkeypatch.setattr(logs, "_level", logs.NORMAL)
    assert not progress.enabled()


# ---- labsync doctor --------------------------------------------------------------------------------
def test_doctor_on_a_good_configuration(env, run, lite_engine, lite_settings, sandbox):
    lite_settings.inbox.mkdir(parents=True)
    authorize(lite_engine, lite_settings)
    code, out, err = run("doctor")
    assert code == 0, out + err
    assert "all checks passed" in out
    code, out, _ = run("doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert {c["check"]: c["status"] for c in report["checks"]} == {
        "settings": "ok", "warehouse": "ok", "encryption key": "ok", "inbox": "ok", "LetsGetChecked": "ok",
        "Rupa": "ok"}
    details = {c["check"]: c["detail"] for c in report["checks"]}
    assert "token fetched (nothing sent)" in details["LetsGetChecked"]
    assert "stored OAuth token" in details["Rupa"] and "usable" in details["Rupa"]
    lgc = sandbox.sandbox.lgc
    assert not lgc.orders and lgc.issued  # a token was fetched, no order was sent
    assert all(token not in out for token in lgc.issued)


def test_doctor_on_a_broken_configuration(env, run, lite_settings, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("LGC_BASE_URL", f"{dead}/lgc")
    monkeypatch.setenv("LABSYNC_FERNET_KEY", "not-a-key")
    monkeypatch.setenv("LABSYNC_INBOX", str(tmp_path / "missing-inbox"))
    code, out, err = run("doctor", "--json")
    assert code == 2, err
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert checks["settings"]["status"] == "ok" and checks["warehouse"]["status"] == "ok"
    assert checks["encryption key"]["status"] == "problem" and "not a Fernet key" in checks["encryption key"]["detail"]
    assert checks["inbox"]["status"] == "problem" and "mkdir -p" in checks["inbox"]["fix"]
    assert checks["LetsGetChecked"]["status"] == "problem"
    assert f"could not reach LetsGetChecked at {dead}/lgc: connection refused (LGC_BASE_URL)" in \
        checks["LetsGetChecked"]["detail"]
    assert checks["Rupa"]["status"] == "problem" and "labsync rupa authorize" in checks["Rupa"]["fix"]

    code, out, _ = run("doctor")  # the table says the same, with what to fix
    assert code == 2 and "problem" in out and "mkdir -p" in out and "problems to fix" in out

    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", f"sqlite:///{tmp_path / 'nowhere' / 'w.db'}")
    monkeypatch.setenv("LABSYNC_HEARTBEAT_SECONDS", "120")  # above the lease: the settings fail
    code, out, _ = run("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 2 and checks["settings"]["status"] == "problem"
    assert "LABSYNC_HEARTBEAT_SECONDS" in checks["settings"]["detail"]
    assert {c["status"] for name, c in checks.items() if name != "settings"} == {"not checked"}
    monkeypatch.delenv("LABSYNC_HEARTBEAT_SECONDS")
    code, out, _ = run("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert checks["warehouse"]["status"] == "problem" and "labsync db upgrade" in checks["warehouse"]["fix"]
    assert not (tmp_path / "nowhere").exists()  # the doctor creates nothing


def test_doctor_names_a_schema_behind(env, run, tmp_path, monkeypatch):
    import sqlalchemy as sa

    from tests.conftest import migrated

    url = migrated(f"sqlite:///{tmp_path / 'behind.db'}")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0007_old'"))
    engine.dispose()
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", url)
    code, out, _ = run("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 2 and checks["warehouse"]["status"] == "problem"
    assert "schema at 0007_old" in checks["warehouse"]["detail"]
    assert checks["warehouse"]["fix"] == "run `labsync db upgrade`"


def test_unusable_file_message_names_the_file_once(env, run, lite_settings):
    box = lite_settings.inbox
    box.mkdir(parents=True)
    (box / "semi.csv").write_bytes((EXAMPLES / "orders_unusable.csv").read_bytes())
    code, out, _ = run("inbox")
    assert code == 1 and out.count("semi.csv") == 1, out
    code, out, _ = run("batches")
    (line,) = [line for line in out.splitlines() if line.startswith("batch ")]
    assert line.count("semi.csv") == 1, line

