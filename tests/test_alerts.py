"""Alerts that reach a person (etl.alerts), against real components on loopback: an SMTP server
(aiosmtpd), a local HTTP sink for the Slack-format and the JSON webhooks, the sandbox
LetsGetChecked, a migrated warehouse. Planted PHI (names, email, clientOrderIds) must appear in
no alert body. One Airflow test: the email of a failed order_batches run under dag.test()."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import replace
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from etl import alerts
from etl.orders import inbox
from etl.settings import AlertSettings
from tests.test_dags import airflow_env  # noqa: F401  (the module-scoped Airflow home fixture)
from tests.test_lgc_support import csv_row, write_csv

PLANTED = ("Zebulonia", "Quixbottom", "zebulonia.q@planted.example", "PHI-CLIENT-", "5550199", "1931-07-04")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    """A real SMTP server on loopback (aiosmtpd): every message it accepted."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[bytes] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
                sink.messages.append(envelope.original_content or envelope.content)
                return "250 OK"

        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter
        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    def subjects(self) -> list[str]:
        return [str(message_from_bytes(m, policy=policy.default)["Subject"]) for m in self.messages]

    def texts(self) -> list[str]:
        """Each message's headers and its decoded text parts (the SMTP hook base64-encodes them)."""
        out = []
        for raw in self.messages:
            mail = message_from_bytes(raw, policy=policy.default)
            parts = [str(v) for v in mail.values()]
            parts += [p.get_content() for p in mail.walk() if p.get_content_maintype() == "text"]
            out.append("\n".join(parts))
        return out

    def conn(self) -> str:
        return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": self.port,
                           "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "labsync@example.org",
                                     "to": "ops@example.org"}})


class HttpSink:
    """A local HTTP server that records every POST (path, JSON body) and answers 200 `ok`."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> HttpSink:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.posts if p == path]

    def slack_conn(self) -> str:
        return json.dumps({"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{self.port}",
                           "password": "/services/T000/B000/XXXX"})

    def hook_conn(self) -> str:
        return json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": self.port, "schema": "http",
                           "extra": {"endpoint": "/hook"}})


SLACK_PATH = "/services/T000/B000/XXXX"


@pytest.fixture
def sinks(monkeypatch):
    with SmtpSink() as smtp, HttpSink() as http:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", smtp.conn())
        monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", http.slack_conn())
        monkeypatch.setenv("AIRFLOW_CONN_HOOK_ALERTS", http.hook_conn())
        yield smtp, http


def with_alerts(settings, **kw):
    return replace(settings, inbox_settle_seconds=0.0, alerts=AlertSettings(
        destinations=("smtp_alerts", "slack_alerts", "hook_alerts"), **kw))


def planted_rows(n: int, start: int = 0) -> list[dict]:
    return [csv_row(i, client_order_id=f"PHI-CLIENT-{i:03d}", first_name="Zebulonia", last_name="Quixbottom",
                    email="zebulonia.q@planted.example", phone_number="5550199000", dob="1931-07-04")
            for i in range(start, start + n)]


def everything_sent(smtp: SmtpSink, http: HttpSink) -> str:
    return "\n".join([*smtp.texts(), *(json.dumps(b) for _, b in http.posts)])


def keys_of(http: HttpSink, status: str) -> list[str]:
    return sorted(b["key"] for b in http.bodies("/hook") if b["status"] == status)


def test_an_unusable_file_and_given_up_rows_alert_once_each_everywhere_without_phi(lite_engine, lite_settings,
                                                                                    sandbox, sinks, tmp_path):
    smtp, http = sinks
    settings = replace(with_alerts(lite_settings), max_attempts=1)
    box = tmp_path / "inbox"
    box.mkdir()
    (box / "patients_unusable.csv").write_text("order id;first name;last name\nA-1;Zebulonia;Quixbottom\n")
    write_csv(box / "orders.csv", planted_rows(3))
    sandbox.sandbox.lgc.forced["PHI-CLIENT-001"] = 503  # fails every time: given up at once (max_attempts 1)
    inbox.run_once(lite_engine, settings)

    first = alerts.evaluate(lite_engine, settings)
    assert sorted(k.split(":")[0] for k in first.fired) == ["batch_incomplete", "batch_unusable", "rows_given_up"]
    assert first.errors == []
    # one message per alert to each destination: email, Slack (its format), the JSON webhook
    assert len(smtp.messages) == 3 and len(http.bodies(SLACK_PATH)) == 3 and len(http.bodies("/hook")) == 3
    assert sorted(smtp.subjects()) == sorted(f"[labsync] ALERT: {t}" for t in (
        "patients_unusable.csv could not be used", "orders.csv is incomplete", "1 row of orders.csv given up"))
    assert all(set(b) >= {"text", "blocks"} and b["text"].startswith(":rotating_light: *[labsync] ALERT")
               for b in http.bodies(SLACK_PATH))
    hook = {b["kind"]: b for b in http.bodies("/hook")}
    assert hook["rows_given_up"]["counts"]["rows_given_up"] == 1
    assert hook["batch_unusable"]["link"].endswith("failed/patients_unusable.summary.html")
    # the same conditions on the next evaluations: folded, nothing sent again
    again = alerts.evaluate(lite_engine, settings)
    assert again.fired == [] and again.sent == 0 and len(smtp.messages) == 3 and len(http.posts) == 6
    sent = everything_sent(smtp, http)
    assert not [p for p in PLANTED if p in sent], sent

    rows = {r["key"].split(":")[0]: r for r in alerts.status(lite_engine)}
    assert rows["batch_unusable"]["state"] == "fired" and rows["rows_given_up"]["state"] == "open"
    assert rows["rows_given_up"]["repeats"] == 1 and rows["rows_given_up"]["sent_to"] == "smtp_alerts,slack_alerts,hook_alerts"


def test_a_tripped_breaker_persisting_over_three_runs_sends_one_alert_and_one_resolved(lite_engine, lite_settings,
                                                                                     sandbox, sinks, tmp_path):
    smtp, http = sinks
    base = with_alerts(lite_settings)
    settings = replace(base, lgc=replace(base.lgc, breaker_failures=2, concurrency=1))
    (tmp_path / "inbox").mkdir()
    write_csv(tmp_path / "inbox" / "orders.csv", planted_rows(6))
    lgc = sandbox.sandbox.lgc
    lgc.faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"], seed=1)
    for _ in range(3):  # the vendor stays down over three runs
        inbox.run_once(lite_engine, settings)
        alerts.evaluate(lite_engine, settings)
    assert keys_of(http, "firing") == ["batch_incomplete:1", "breaker_tripped:1"]
    lgc.faults.reset()
    inbox.run_once(lite_engine, settings)  # back: the rows go through
    cleared = alerts.evaluate(lite_engine, settings)
    assert sorted(cleared.resolved) == ["batch_incomplete:1", "breaker_tripped:1"]
    alerts.evaluate(lite_engine, settings)  # nothing more to say
    for path in ("/hook", SLACK_PATH):
        statuses = sorted(b.get("status") or b["text"].split("*")[1].split(":")[0] for b in http.bodies(path))
        assert len(statuses) == 4, (path, statuses)  # two conditions: one alert + one resolved each
    assert keys_of(http, "resolved") == ["batch_incomplete:1", "breaker_tripped:1"]
    breaker_mail = [s for s in smtp.subjects() if "stopped answering" in s]
    assert breaker_mail == ["[labsync] ALERT: LetsGetChecked stopped answering during orders.csv",
                            "[labsync] RESOLVED: LetsGetChecked stopped answering during orders.csv"]
    sent = everything_sent(smtp, http)
    assert not [p for p in PLANTED if p in sent], sent


def test_a_condition_that_clears_and_comes_back_within_the_quiet_period_is_one_alert(lite_engine, lite_settings):
    settings = replace(lite_settings, alerts=AlertSettings(quiet_minutes=60))
    messages = []

    def send(batch):
        messages.extend(batch)
        return ["memory"], []

    failed = alerts.Condition("dag_failed:order_batches", "order_batches run failed", "Run r1 failed.")
    alerts.evaluate(lite_engine, settings, events=[failed], send=send)
    alerts.evaluate(lite_engine, settings, events=[failed], send=send)  # the next run failed too: folded
    alerts.evaluate(lite_engine, settings, resolve=["dag_failed:order_batches"], send=send)  # a run succeeded
    alerts.evaluate(lite_engine, settings, events=[failed], send=send)  # fails again at once: flapping
    assert [m.status for m in messages] == ["firing", "resolved"]
    (row,) = [r for r in alerts.status(lite_engine) if r["kind"] == "dag_failed"]
    assert row["state"] == "open" and row["repeats"] == 2


def test_the_cli_sends_a_test_message_to_each_destination_and_lists_the_alerts(lite_settings, sinks, monkeypatch,
                                                                               capsys):
    from etl.cli import main

    smtp, http = sinks
    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", lite_settings.warehouse_url)
    monkeypatch.setenv("LABSYNC_ALERTS", "smtp_alerts, slack_alerts,hook_alerts")
    monkeypatch.setenv("LABSYNC_INBOX", str(lite_settings.inbox))
    assert main(["alerts", "test"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("sent:")] == [
        "sent: smtp_alerts", "sent: slack_alerts", "sent: hook_alerts"]
    assert smtp.subjects() == ["[labsync] TEST: a test message from `labsync alerts test`"]
    assert http.bodies("/hook")[0]["status"] == "test" and len(http.bodies(SLACK_PATH)) == 1

    assert main(["alerts", "--json"]) == 0  # nothing open
    listed = json.loads(capsys.readouterr().out)
    assert listed["alerts"] == [] and listed["open"] == 0 and listed["at"].endswith("Z")

    # `labsync inbox` (what the order_batches DAG does, in one process) sends the same alerts
    inbox_dir = lite_settings.inbox
    inbox_dir.mkdir(parents=True, exist_ok=True)
    (inbox_dir / "patients_unusable.csv").write_text("order id;first name;last name\nA-1;Zebulonia;Quixbottom\n")
    monkeypatch.setenv("LABSYNC_INBOX_SETTLE_SECONDS", "0")
    assert main(["inbox"]) == 1
    capsys.readouterr()
    assert [b["title"] for b in http.bodies("/hook")[1:]] == ["patients_unusable.csv could not be used"]
    assert main(["alerts", "--json"]) == 0  # an unusable file fires once and stays listed as fired
    (listed,) = json.loads(capsys.readouterr().out)["alerts"]
    assert listed["state"] == "fired" and listed["sent_to"] == "smtp_alerts,slack_alerts,hook_alerts"
    assert not [p for p in PLANTED if p in everything_sent(smtp, http)]

    monkeypatch.setenv("AIRFLOW_CONN_HOOK_ALERTS", json.dumps({"conn_type": "http", "host": "127.0.0.1",
                                                               "port": free_port(), "schema": "http"}))
    assert main(["alerts", "test"]) == 2  # one destination did not take it: named, without its URL
    err = capsys.readouterr().err
    assert "not sent: hook_alerts: ConnectError" in err and "127.0.0.1" not in err


def test_airflows_deadline_alert_callback_sends_a_run_past_its_deadline_once(lite_settings, sinks, monkeypatch):
    """The callable the DAGs' Deadline Alert names (LABSYNC_RUN_DEADLINE_MINUTES): Airflow's
    triggerer awaits it with the run's context; a second call for the same run sends nothing."""
    import asyncio

    from etl.airflow import alerting, tasks

    smtp, http = sinks
    settings = replace(with_alerts(lite_settings), alerts=AlertSettings(destinations=("hook_alerts",),
                                                                         airflow_url="http://airflow.example"))
    monkeypatch.setattr(tasks, "airflow_settings", lambda **kw: settings)
    monkeypatch.setenv("LABSYNC_RUN_DEADLINE_MINUTES", "30")
    for _ in range(2):
        asyncio.run(alerting.deadline_missed("order_batches", {"dag_run": {"run_id": "scheduled__2026-12-05"}}))
    (body,) = http.bodies("/hook")
    assert body["key"] == "deadline_missed:order_batches:scheduled__2026-12-05"
    assert body["title"] == "order_batches run past its deadline" and "30 minutes" in body["detail"]
    assert body["link"] == "http://airflow.example/dags/order_batches/runs/scheduled__2026-12-05"


# ---- under Airflow: the DAG-level callback every labsync DAG has ----------------------------------

@pytest.mark.airflow
def test_a_failed_order_batches_run_emails_its_alert_under_dag_test(airflow_env, sandbox, tmp_path):  # noqa: F811
    from tests.conftest import migrated
    from tests.test_dags import probe

    box = tmp_path / "inbox"
    box.mkdir()
    (box / "patients_unusable.csv").write_text("order id;first name;last name\nA-1;Zebulonia;Quixbottom\n")
    write_csv(box / "orders.csv", planted_rows(2))
    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    with SmtpSink() as smtp:
        extra = dict(LABSYNC_WAREHOUSE_URL=url, LABSYNC_INBOX=str(box), LABSYNC_INBOX_SETTLE_SECONDS="0",
                     LGC_BASE_URL=sandbox.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
                     LABSYNC_ALERTS="smtp_alerts", AIRFLOW_CONN_SMTP_ALERTS=smtp.conn(),
                     LABSYNC_AIRFLOW_URL="http://airflow.example")
        result = probe(airflow_env, "test", "order_batches", extra=extra)
        assert result["state"] == "failed", result
        subjects = smtp.subjects()
        assert sorted(subjects) == ["[labsync] ALERT: order_batches run failed",
                                    "[labsync] ALERT: patients_unusable.csv could not be used"], subjects
        run_mail = next(t for t in smtp.texts() if "order_batches run failed" in t)
        assert "http://airflow.example/dags/order_batches/runs/" in run_mail
        assert "failed at task check" in run_mail
        assert not [p for p in PLANTED if p in "\n".join(smtp.texts())]
    assert os.path.exists(url.split("///", 1)[1])



def test_without_the_airflow_providers_email_and_slack_go_out_all_the_same(lite_settings, sinks, monkeypatch):
    """A CLI host without Airflow's SMTP/Slack providers: smtplib and a plain POST, same messages."""
    from etl.airflow import notifiers
    from etl.alerts.destinations import send_all

    smtp, http = sinks
    monkeypatch.setattr(notifiers, "available", lambda name: None)
    took, errors = send_all(with_alerts(lite_settings), [alerts.test_message()])
    assert took == ["smtp_alerts", "slack_alerts", "hook_alerts"] and errors == []
    assert smtp.subjects() == ["[labsync] TEST: a test message from `labsync alerts test`"]
    assert "If you read this, alerts reach you here." in smtp.texts()[0]
    (slack,) = http.bodies(SLACK_PATH)
    assert slack["text"].startswith(":wave: *[labsync] TEST")


@pytest.mark.parametrize(("name", "value", "words"), [
    ("LABSYNC_ALERT_QUIET_MINUTES", "nan", "LABSYNC_ALERT_QUIET_MINUTES must be a finite number"),
    ("LABSYNC_ALERT_WEBHOOK_MINUTES", "0", "LABSYNC_ALERT_WEBHOOK_MINUTES must be above 0"),
    ("LABSYNC_ALERTS", "smtp alerts;x", "LABSYNC_ALERTS must be comma-separated Airflow connection ids"),
])
def test_a_bad_alert_setting_exits_2_naming_it(lite_settings, monkeypatch, capsys, name, value, words):
    from etl.cli import main

    monkeypatch.setenv("LABSYNC_WAREHOUSE_URL", lite_settings.warehouse_url)
    monkeypatch.setenv(name, value)
    assert main(["alerts"]) == 2
    assert words in capsys.readouterr().err
