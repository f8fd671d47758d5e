"""`labsync load` and `labsync status`, run in-process against the sandbox (SQLite and
PostgreSQL): exit codes, --dry-run, the ledger views, and no PHI or token in any log line."""

from __future__ import annotations

import json
import logging

import pytest

from etl import cli, logs
from tests.test_lgc_support import cli_env, csv_row, fast, ledger, write_csv


@pytest.fixture
def run(settings, monkeypatch, capsys):
    """Run `labsync ARGS` in this process with the environment pointing at the sandbox."""
    env = cli_env(fast(settings, concurrency=4))
    for key in list(__import__("os").environ):
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.setenv(key, value)

    def _run(*args: str, **extra_env: str):
        with monkeypatch.context() as m:  # extra variables for this one run only
            for key, value in extra_env.items():
                m.setenv(key, value)
            code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def _lgc(sandbox):
    return sandbox.sandbox.lgc


def test_load_all_accepted_exits_0_and_status_reads_the_ledger(run, sandbox, engine, tmp_path):
    path = write_csv(tmp_path / "batch1.csv", [csv_row(i) for i in range(5)])
    code, out, err = run("load", str(path))
    assert code == 0, err
    assert "5 rows, 5 valid, 0 rejected" in out and "accepted 5" in out
    assert len(_lgc(sandbox).orders) == 5

    code, out, _ = run("status", "ORD-00003", "--json")
    assert code == 0
    row = json.loads(out)
    assert row["state"] == "accepted" and row["batch"] == "batch1.csv" and row["line"] == 5
    assert row["order_item_ids"] == _lgc(sandbox).orders["ORD-00003"]["response"]["orderItems"]

    code, out, _ = run("status", "--batch", "batch1.csv", "--json")
    assert code == 0 and len(json.loads(out)) == 5
    code, out, _ = run("status", "--batch", "batch1.csv")
    assert code == 0 and "5 orders: accepted 5" in out and "ORD-00004" in out
    code, out, _ = run("status")
    assert code == 0 and "accepted 5" in out
    code, _, err = run("status", "NOPE")
    assert code == 1 and "not in the ledger" in err

    # the same file again: nothing is sent, still all accepted
    code, out, _ = run("load", str(path))
    assert code == 0 and "sent 0" in out
    assert sum(_lgc(sandbox).put_count.values()) == 5


def test_rejected_rows_exit_1(run, sandbox, engine, tmp_path):
    records = [csv_row(i) for i in range(4)]
    records[1]["dob"] = "not a date"  # rejected by validation, never sent
    _lgc(sandbox).forced["ORD-00002"] = 400  # rejected by LetsGetChecked
    path = write_csv(tmp_path / "batch2.csv", records)
    code, out, err = run("load", str(path))
    assert code == 1, err
    assert "1 rejected" in out and "accepted 2, rejected 1" in out
    assert (tmp_path / "batch2.rejects.csv").exists()
    assert "ORD-00001" not in _lgc(sandbox).put_count
    assert ledger(engine)["ORD-00002"]["state"] == "rejected"


def test_unusable_file_and_bad_configuration_exit_2_and_send_nothing(run, sandbox, engine, tmp_path):
    records = [csv_row(0)]
    del records[0]["last_name"]
    path = write_csv(tmp_path / "nolast.csv", records, columns=list(records[0]))
    code, _, err = run("load", str(path))
    assert code == 2 and "last_name" in err and "Traceback" not in err
    good = write_csv(tmp_path / "good.csv", [csv_row(0)])
    code, _, err = run("load", str(good), LGC_CLIENT_ID="TOOLONG")
    assert code == 2 and "LGC_CLIENT_ID" in err
    code, _, err = run("load", str(good), LGC_ACCESS_KEY="a" * 25, LGC_SECRET_KEY="b" * 25)
    assert code == 2 and "refused the credentials" in err and "a" * 25 not in err
    assert _lgc(sandbox).put_count == {} and ledger(engine) == {}


def test_a_401_after_refresh_exits_2(run, sandbox, engine, tmp_path):
    _lgc(sandbox).reject_tokens = True
    path = write_csv(tmp_path / "b.csv", [csv_row(i) for i in range(3)])
    code, _, err = run("load", str(path))
    assert code == 2 and "stopped early" in err and "401" in err


def test_dry_run_sends_nothing_and_masks_credentials(run, sandbox, engine, tmp_path):
    path = write_csv(tmp_path / "dry.csv", [csv_row(i) for i in range(3)])
    code, out, err = run("load", str(path), "--dry-run")
    assert code == 0, err
    assert "3 requests would be sent" in out and "Nothing was sent" in out
    lines = (tmp_path / "dry.requests.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines]
    assert requests[0]["url"].endswith("/oauth2/token?grant_type=client_credentials")
    assert requests[0]["headers"]["Authorization"] == "Basic ***"
    puts = requests[1:]
    assert [r["url"].rsplit("/", 1)[1] for r in puts] == ["ORD-00000", "ORD-00001", "ORD-00002"]
    assert all(r["method"] == "PUT" and r["headers"]["Authorization"] == "Bearer ***" for r in puts)
    assert puts[0]["body"]["patientInfo"]["participantId"] == "P00000"
    text = "\n".join(lines)
    from etl.settings import SANDBOX_LGC_ACCESS_KEY, SANDBOX_LGC_SECRET_KEY

    assert SANDBOX_LGC_ACCESS_KEY not in text and SANDBOX_LGC_SECRET_KEY not in text
    code, out, _ = run("load", str(path), "--dry-run", "--requests", "-",
                       LGC_API_TOKEN="ready-token-abcdef0123456789")
    assert code == 0 and "ready-token-abcdef0123456789" not in out
    assert out.count('"Bearer ***"') == 3 and "oauth2" not in out
    lgc = _lgc(sandbox)
    assert lgc.token_requests == 0 and lgc.put_count == {} and ledger(engine) == {}


PHI = {
    "first_name": "Zelphinia", "middle_name": "Marisolde", "last_name": "Quorrington",
    "dob": "1977-03-29", "email": "zelphinia.q@phi-test.example", "phone_number": "5551234987",
}


def test_no_phi_or_token_in_any_log_line_of_a_load(run, sandbox, engine, tmp_path, caplog, monkeypatch):
    def verbose(*_level) -> None:  # everything at DEBUG, httpx and httpcore included
        for name in ("etl", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.DEBUG)

    monkeypatch.setattr(logs, "configure", verbose)
    caplog.set_level(logging.DEBUG)
    lgc = _lgc(sandbox)
    records = [csv_row(i, **PHI) for i in range(12)]
    records[5]["dob"] = "1977-02-30"  # the CSV rejects this one, echoing the value in its report
    path = write_csv(tmp_path / "phi.csv", records)
    lgc.forced["ORD-00001"] = 400  # the vendor's reason echoes name, dob, email and phone
    lgc.faults.update(script=[503, "drop", 429], retry_after=0.01, exempt_paths=["/lgc/oauth2"])
    code, out, err = run("load", str(path))
    assert code == 1
    assert ledger(engine)["ORD-00001"]["state"] == "rejected"
    code2, status_out, status_err = run("status", "--batch", "phi.csv", "--json")
    assert code2 == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ORD-00001" in logged and len(caplog.records) > 20  # the capture did see the load
    secrets = [*PHI.values(), "1977-02-30", *lgc.issued]
    for where, text in (("logs", logged), ("stdout", out), ("stderr", err),
                        ("status", status_out + status_err)):
        for value in secrets:
            assert value not in text, f"{value!r} appears in {where}"
        assert "phi-test" not in text
    assert all(not r["last_error"] or "Zelphinia" not in r["last_error"] for r in ledger(engine).values())
