"""Airflow's notifiers for etl.alerts.destinations: email through apache-airflow-providers-smtp's
SmtpNotifier, Slack through apache-airflow-providers-slack's SlackWebhookNotifier. Each is used
only when its provider is installed (`available()`); etl.alerts.destinations falls back to the
standard library / a plain POST otherwise. The messages are built by etl.alerts (PHI-free) and
passed as they are: no Jinja rendering of their text."""

from __future__ import annotations

import importlib.util
from typing import Any


def available(name: str):
    """`send_smtp` / `send_slack` when its provider is installed, else None."""
    module = {"send_smtp": "airflow.providers.smtp", "send_slack": "airflow.providers.slack"}[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return globals()[name] if found else None


def send_smtp(conn_id: str, to: list[str], from_email: str, subject: str, html: str) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    SmtpNotifier(to=to, from_email=from_email, subject=subject, html_content=html, smtp_conn_id=conn_id).notify({})


def send_slack(conn_id: str, text: str, blocks: list[dict[str, Any]]) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text, blocks=blocks).notify({})


def airflow_connection(conn_id: str) -> dict | None:
    """A connection's fields through Airflow (metadata database, secrets backends), or None."""
    from etl.airflow.hooks import _is_not_found, extra_of

    try:
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
    except Exception as exc:
        if _is_not_found(exc):
            return None
        raise
    return {"conn_type": conn.conn_type or "", "host": conn.host, "port": conn.port, "login": conn.login,
            "password": conn.password, "schema": conn.schema, "extra": extra_of(conn)}
