"""The tasks' settings: the environment (etl.settings.Settings.from_env) overlaid with the
Airflow Connections, read through the Hooks (etl.airflow.hooks), plus the warehouse Connection
and the Fernet Variable. The DAG tasks call `task_settings()` (through etl.airflow.tasks.airflow_settings).

    lgc_default  (type labsync-lgc):  see etl.airflow.hooks.LgcHook
    rupa_default (type labsync-rupa): see etl.airflow.hooks.RupaHook
    labsync_warehouse (optional): its URI (or extra `sqlalchemy_url`) is the SQLAlchemy URL
    Variable labsync_fernet_secret: the key for stored tokens when LABSYNC_FERNET_KEY is not set
        (Airflow masks it in logs: its name contains "secret")
    Variable labsync_alerts: where alerts go when LABSYNC_ALERTS is not set (etl.alerts)

A Connection that does not exist leaves the environment's values in place, except for the
vendors named in `require` ("lgc", "rupa"): a task that talks to a vendor with neither its
Connection nor its base-URL variable fails with a message naming both, instead of silently
aiming at the local sandbox.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace

from etl.airflow.hooks import LgcHook, RupaHook, _is_not_found, extra_of
from etl.errors import ConfigError
from etl.settings import Settings, split_list

log = logging.getLogger(__name__)

FERNET_VARIABLE = "labsync_fernet_secret"
ALERTS_VARIABLE = "labsync_alerts"  # where alerts go when LABSYNC_ALERTS is not set (etl.alerts)


def task_settings(
    *,
    lgc_conn_id: str = LgcHook.default_conn_name,
    rupa_conn_id: str = RupaHook.default_conn_name,
    warehouse_conn_id: str = "labsync_warehouse",
    env: Mapping[str, str] | None = None,
    require: tuple[str, ...] = (),
) -> Settings:
    env = os.environ if env is None else env
    base = Settings.from_env(env)
    lgc = LgcHook(lgc_conn_id).settings(base.lgc)
    rupa = RupaHook(rupa_conn_id).settings(base.rupa)
    for vendor, found, conn_id, variable in (("lgc", lgc, lgc_conn_id, "LGC_BASE_URL"),
                                             ("rupa", rupa, rupa_conn_id, "RUPA_BASE_URL")):
        if vendor in require and found is None and not (env.get(variable) or "").strip():
            raise ConfigError(
                f"the Airflow Connection {conn_id!r} does not exist and {variable} is not set: "
                f"create the Connection (see the README) or set {variable}"
            )
    wh = _connection(warehouse_conn_id)
    warehouse_url = (_sqlalchemy_url(wh) if wh is not None else None) or base.warehouse_url
    alerts = base.alerts
    if not alerts.destinations:  # LABSYNC_ALERTS unset: the Airflow Variable labsync_alerts
        alerts = replace(alerts, destinations=split_list(_variable(ALERTS_VARIABLE)))
    return replace(base, lgc=lgc or base.lgc, rupa=rupa or base.rupa, warehouse_url=warehouse_url,
                   fernet_key=base.fernet_key or _variable(FERNET_VARIABLE), alerts=alerts)


def _connection(conn_id: str):
    from airflow.sdk import Connection

    try:
        return Connection.get(conn_id)
    except Exception as exc:
        if not _is_not_found(exc):
            log.warning("could not read the Airflow Connection %r (%s); using the environment",
                        conn_id, type(exc).__name__)
        return None


def _variable(key: str) -> str | None:
    from airflow.sdk import Variable

    try:
        value = Variable.get(key, default=None)
    except Exception:  # no API server reachable: fall back to the other sources
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _sqlalchemy_url(conn) -> str | None:
    extra = extra_of(conn)
    if extra.get("sqlalchemy_url"):
        return extra["sqlalchemy_url"]
    try:
        uri = conn.get_uri()
    except Exception:
        return None
    for prefix in ("postgres://", "postgresql://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg://" + uri[len(prefix):]
    return uri
