"""Where alerts go: the Airflow connections LABSYNC_ALERTS names, by their type.

    smtp                    email, through apache-airflow-providers-smtp's SmtpNotifier; the
                            recipients are LABSYNC_ALERT_EMAIL_TO, else the connection's extra
                            `to`, else the sender address (extra `from_email`)
    slackwebhook / slack    Slack, through apache-airflow-providers-slack's SlackWebhookNotifier
                            (password = the webhook token or the whole hooks.slack.com URL)
    http / https            a generic JSON webhook (Teams, PagerDuty, Opsgenie via their inbound
                            webhooks, or your own): POST of Message.as_dict() to the connection's
                            URL (host, port, schema; extra `endpoint` for the path, `headers`)

Connections are read as Airflow reads them: inside Airflow through Airflow (so a secrets
backend works); outside it from AIRFLOW_CONN_<ID> (a URI or Airflow's JSON form) — the CLI needs
no Airflow for that. Without the provider installed, email goes out with smtplib and Slack with a
plain POST of the same payload. Messages are etl.alerts.Message objects (duck-typed here: the
package imports this module). A destination that fails is named with the error's class and
status only (no secret, no URL with a token).
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from etl.errors import ConfigError
from etl.settings import Settings

log = logging.getLogger(__name__)

EMAIL, SLACK, WEBHOOK = "email", "slack", "webhook"
KIND_OF_TYPE = {"smtp": EMAIL, "email": EMAIL, "slackwebhook": SLACK, "slack_webhook": SLACK,
                "slack": SLACK, "http": WEBHOOK, "https": WEBHOOK}


@dataclass(frozen=True)
class Conn:
    """The fields of an Airflow connection labsync uses."""

    conn_id: str
    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    extra: Mapping = field(default_factory=dict)

    @property
    def kind(self) -> str:
        kind = KIND_OF_TYPE.get(self.conn_type.lower().replace("-", "_"))
        if kind is None:
            raise ConfigError(f"alert destination {self.conn_id!r} is a {self.conn_type!r} connection; "
                              "use smtp, slackwebhook or http")
        return kind


def parse_env_connection(conn_id: str, raw: str) -> Conn:
    """AIRFLOW_CONN_<ID>'s value as Airflow reads it: JSON, or a URI whose path is the schema
    and whose query is the extra (or `__extra__` = JSON)."""
    raw = raw.strip()
    if raw.startswith("{"):
        d = json.loads(raw)
        extra = d.get("extra") or {}
        if isinstance(extra, str):
            extra = json.loads(extra) if extra.strip() else {}
        return Conn(conn_id, str(d.get("conn_type") or ""), d.get("host"), _int(d.get("port")), d.get("login"),
                    d.get("password"), d.get("schema"), extra)
    parts = urlsplit(raw)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extra = json.loads(query.pop("__extra__")) if "__extra__" in query else query
    return Conn(conn_id, parts.scheme.replace("-", "_"), unquote(parts.hostname or "") or None, parts.port,
                unquote(parts.username) if parts.username else None,
                unquote(parts.password) if parts.password else None,
                unquote(parts.path.lstrip("/")) or None, extra)


def _int(value) -> int | None:
    return None if value in (None, "") else int(value)


def get_connection(conn_id: str, env: Mapping[str, str] | None = None) -> Conn:
    env = os.environ if env is None else env
    raw = env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if raw:
        try:
            return parse_env_connection(conn_id, raw)
        except (ValueError, TypeError):
            raise ConfigError(f"AIRFLOW_CONN_{conn_id.upper()} is neither a connection URI nor "
                              "Airflow's JSON form") from None
    try:  # inside Airflow: its connections (metadata database, secrets backend)
        from etl.airflow.notifiers import airflow_connection
    except ImportError:
        raise ConfigError(f"alert destination {conn_id!r}: set AIRFLOW_CONN_{conn_id.upper()} "
                          "(no Airflow here to ask)") from None
    found = airflow_connection(conn_id)
    if found is None:
        raise ConfigError(f"alert destination {conn_id!r}: no such Airflow connection "
                          f"(nor AIRFLOW_CONN_{conn_id.upper()})")
    return Conn(conn_id, **found)


def send_all(settings: Settings, messages: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Send each message to every destination. (connection ids that took them, errors)."""
    took: list[str] = []
    errors: list[str] = []
    for conn_id in settings.alerts.destinations:
        try:
            conn = get_connection(conn_id)
            for message in messages:
                send(settings, conn, message)
        except Exception as exc:  # one destination down must not stop the others
            errors.append(f"{conn_id}: {_plain(exc)}")
            log.warning("alert destination %s failed: %s", conn_id, _plain(exc))
            continue
        took.append(conn_id)
    return took, errors


def _plain(exc: BaseException) -> str:
    """The error's class and, for HTTP, its status: never its text (it may echo a URL with a token)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")


def send(settings: Settings, conn: Conn, message: Any) -> None:
    kind = conn.kind
    if kind == EMAIL:
        send_email(settings, conn, message)
    elif kind == SLACK:
        send_slack(conn, message)
    else:
        send_webhook(settings, conn, message)


# ---- email ---------------------------------------------------------------------------------------

def recipients(settings: Settings, conn: Conn) -> list[str]:
    to = list(settings.alerts.email_to)
    if not to:
        raw = conn.extra.get("to") or ""
        to = [p.strip() for p in (raw if isinstance(raw, list) else str(raw).split(",")) if p.strip()]
    if not to:  # the mailbox alerts are sent from (an ops address) rather than nobody
        log.warning("alert destination %s: no recipients (LABSYNC_ALERT_EMAIL_TO or the extra `to`); "
                    "sending to the sender address", conn.conn_id)
        to = [sender(conn)]
    return to


def sender(conn: Conn) -> str:
    """The extra `from_email` (Airflow's SMTP rule), else a login that is an address, else labsync@<host>."""
    login = conn.login if conn.login and "@" in conn.login else None
    return str(conn.extra.get("from_email") or login or f"labsync@{conn.host or 'localhost'}")


def email_html(message: Any) -> str:
    from html import escape

    body = "".join(f"<p>{escape(line)}</p>" for line in message.text().split("\n")[1:] if line != message.link)
    if message.link:
        body += f'<p><a href="{escape(message.link, quote=True)}">{escape(message.link)}</a></p>'
    return body


def send_email(settings: Settings, conn: Conn, message: Any) -> None:
    to = recipients(settings, conn)
    via_airflow = _airflow("send_smtp")
    if via_airflow is not None:  # apache-airflow-providers-smtp's SmtpNotifier
        via_airflow(conn.conn_id, to, sender(conn), message.subject, email_html(message))
        return
    _smtplib(conn, to, message)


def _airflow(name: str):
    """A sender of etl.airflow.notifiers, or None without Airflow or the provider."""
    try:
        from etl.airflow import notifiers
    except ImportError:
        return None
    return notifiers.available(name)


def _smtplib(conn: Conn, to: list[str], message: Any) -> None:
    """Without apache-airflow-providers-smtp: the same connection fields, the standard library."""
    extra = conn.extra
    mail = EmailMessage()
    mail["Subject"], mail["From"], mail["To"] = message.subject, sender(conn), ", ".join(to)
    mail.set_content(message.text())
    mail.add_alternative(email_html(message), subtype="html")
    ssl_on = not _true(extra.get("disable_ssl"))
    timeout = float(extra.get("timeout") or 30)
    port = conn.port or (465 if ssl_on else 587)
    client = (smtplib.SMTP_SSL if ssl_on else smtplib.SMTP)(conn.host or "localhost", port, timeout=timeout)
    with client:
        if not ssl_on and not _true(extra.get("disable_tls")):
            client.starttls()
        if conn.login and conn.password:
            client.login(conn.login, conn.password)
        client.send_message(mail)


def _true(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


# ---- Slack ---------------------------------------------------------------------------------------

def slack_payload(message: Any) -> dict:
    icon = {"firing": ":rotating_light:", "reminder": ":hourglass:", "resolved": ":white_check_mark:",
            "test": ":wave:"}[message.status]
    text = f"{icon} *{message.subject}*"
    if message.detail:
        text += f"\n{message.detail}"
    if message.link:
        text += f"\n<{message.link}|{'summary' if '/dags/' not in message.link else 'Airflow run'}>"
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


def slack_url(conn: Conn) -> str:
    """As SlackWebhookHook builds it: a whole URL in the password, or host + token."""
    token = (conn.password or "").strip()
    if not token:
        raise ConfigError(f"alert destination {conn.conn_id!r}: the Slack webhook token goes in the password")
    if "://" in token:
        return token
    base = conn.host if conn.host and "://" in conn.host else f"{conn.schema or 'https'}://{conn.host or 'hooks.slack.com/services'}"
    return base.rstrip("/") + "/" + token.lstrip("/")


def send_slack(conn: Conn, message: Any) -> None:
    payload = slack_payload(message)
    via_airflow = _airflow("send_slack")
    if via_airflow is not None:  # apache-airflow-providers-slack's SlackWebhookNotifier
        via_airflow(conn.conn_id, payload["text"], payload["blocks"])
        return
    _post(slack_url(conn), payload, {}, 30.0)


# ---- a generic JSON webhook -----------------------------------------------------------------------

def webhook_url(conn: Conn) -> str:
    host = conn.host or ""
    if "://" in host:
        base = host
    else:
        scheme = conn.schema if conn.schema in ("http", "https") else ("https" if conn.conn_type != "http" else "http")
        if not host:
            raise ConfigError(f"alert destination {conn.conn_id!r}: the connection has no host")
        base = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    path = str(conn.extra.get("endpoint") or (conn.schema if conn.schema not in (None, "http", "https") else "") or "")
    return base.rstrip("/") + ("/" + path.lstrip("/") if path else "")


def send_webhook(settings: Settings, conn: Conn, message: Any) -> None:
    headers = conn.extra.get("headers") or {}
    if isinstance(headers, str):
        headers = json.loads(headers)
    if conn.password and not any(k.lower() == "authorization" for k in headers):
        headers = {**headers, "Authorization": f"Bearer {conn.password}"}
    _post(webhook_url(conn), message.as_dict(), headers, float(conn.extra.get("timeout") or 30))


def _post(url: str, payload: dict, headers: Mapping[str, str], timeout: float) -> None:
    import httpx

    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        client.post(url, json=payload, headers=dict(headers)).raise_for_status()
