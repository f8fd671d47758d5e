"""Airflow Hooks for the two vendors: connection types `labsync-lgc` and `labsync-rupa`.

Why Hooks: a Connection of a registered type gets a form in the UI (labelled fields, hidden ones
it does not use, the client id and token as their own fields) and a Test button that really asks
the vendor for a token; a plain `http` Connection has neither. The Hooks are also the only place
that reads these Connections for the tasks: `settings()` turns one into the same `LgcSettings` /
`RupaSettings` the CLI builds from the environment (etl.settings), so there is one settings
object and one set of checks (`validated()`).

A Connection (any type: older `http` ones keep working) maps as
    labsync-lgc:  host = API base URL, login = access key, password = secret key,
                  extra client_id, access_token (optional, a ready token)
    labsync-rupa: host = API base URL, login = OAuth client id, password = OAuth client secret,
                  extra access_token (optional, a ready token)
and both carry the network settings in their extras, as Airflow's HTTP provider does
(etl.settings.NetworkSettings): `proxy` (a URL; Airflow's `proxies` {"https": …} is read too),
`ca_bundle` (or `verify` as a path), `client_cert` (or `cert`), `client_key` (or `key`),
`timeout` (seconds). Unset extras leave the environment's <VENDOR>_PROXY, … in place. A Rupa
Connection's extra `result_origins` (a list or a comma-separated string) is RUPA_RESULT_ORIGINS.
The host may be a whole URL or a bare host name (then https, or the schema field if it says
http). Extra keys may also carry Airflow's old `extra__<type>__` prefix.

`test_connection()` answers (ok, one sentence): no secret and no PHI in the sentence, ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any, ClassVar

from airflow.sdk import BaseHook  # Airflow >= 3.1, the lowest labsync supports

from etl.airflow.provider import CONNECTION_FORMS, LGC_CONN_TYPE, RUPA_CONN_TYPE
from etl.errors import LabsyncError
from etl.settings import (
    LgcSettings,
    NetworkSettings,
    RetrySettings,
    RupaSettings,
    Settings,
    parse_number,
)

log = logging.getLogger(__name__)

# The Test button should answer within seconds, not after the tasks' long retry policy.
TEST_RETRY = RetrySettings(max_attempts=2, initial_wait=0.2, max_wait=1.0, timeout=15.0)


def _form_widgets(conn_type: str) -> dict[str, Any]:
    """wtforms fields for Airflow 3.1's connection form (3.2+ reads `conn-fields` instead)."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import PasswordField, StringField

    widgets = {}
    for name, (label, description, secret) in CONNECTION_FORMS[conn_type]["fields"].items():
        kind, widget = (PasswordField, BS3PasswordFieldWidget) if secret else (StringField, BS3TextFieldWidget)
        widgets[name] = kind(lazy_gettext(label), widget=widget(), description=description)
    return widgets


def _field_behaviour(conn_type: str) -> dict[str, Any]:
    b = CONNECTION_FORMS[conn_type]["behaviour"]
    return {"hidden_fields": list(b["hidden_fields"]), "relabeling": dict(b["relabeling"]),
            "placeholders": dict(b["placeholders"])}


def extra_of(conn: Any) -> dict:
    """A Connection's extra as a dict, whatever shape it was stored in ({} when unreadable)."""
    try:
        extra = conn.extra_dejson
    except Exception:
        extra = conn.extra if isinstance(getattr(conn, "extra", None), str) else {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            extra = {}
    return extra if isinstance(extra, dict) else {}


def extra_field(conn: Any, conn_type: str, *names: str) -> str | None:
    """The first non-empty extra field of `names` (plain or `extra__<type>__` prefixed)."""
    extra = extra_of(conn)
    for name in names:
        for key in (name, f"extra__{conn_type}__{name}"):
            value = extra.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def base_url_of(conn: Any) -> str | None:
    """host may hold a whole URL (`https://api.rupahealth.com`) or a bare host name."""
    host = (conn.host or "").strip()
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    scheme = conn.schema if conn.schema in ("http", "https") else "https"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}".rstrip("/")


def network_from_connection(conn: Any, conn_type: str, prefix: str, base: NetworkSettings) -> NetworkSettings:
    """The connection's network extras over `base` (the environment's)."""
    extra = extra_of(conn)
    proxies = extra.get("proxies")
    proxy = extra_field(conn, conn_type, "proxy")
    if proxy is None and isinstance(proxies, dict):  # Airflow's HTTP provider shape
        found = proxies.get("https") or proxies.get("http") or proxies.get("all")
        proxy = found.strip() if isinstance(found, str) and found.strip() else None
    timeout = extra.get("timeout")
    if isinstance(timeout, str) and timeout.strip():
        timeout = parse_number(f"{prefix}_TIMEOUT", timeout.strip())
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        timeout = parse_number(f"{prefix}_TIMEOUT", str(timeout))
    else:
        timeout = None
    verify = extra_field(conn, conn_type, "ca_bundle", "verify")
    if verify is not None and verify.lower() in ("true", "false"):
        verify = None  # a boolean `verify`: labsync always verifies; only a bundle path is taken
    return replace(
        base,
        proxy=proxy or base.proxy,
        ca_bundle=verify or base.ca_bundle,
        client_cert=extra_field(conn, conn_type, "client_cert", "cert") or base.client_cert,
        client_key=extra_field(conn, conn_type, "client_key", "key") or base.client_key,
        timeout=timeout if timeout is not None else base.timeout,
    )


def lgc_from_connection(conn: Any, base: LgcSettings) -> LgcSettings:
    return replace(
        base,
        base_url=base_url_of(conn) or base.base_url,
        access_key=(conn.login or "").strip() or base.access_key,
        secret_key=(conn.password or "").strip() or base.secret_key,
        client_id=extra_field(conn, LGC_CONN_TYPE, "client_id") or base.client_id,
        api_token=extra_field(conn, LGC_CONN_TYPE, "access_token", "api_token") or base.api_token,
        network=network_from_connection(conn, LGC_CONN_TYPE, "LGC", base.network),
    )


def rupa_from_connection(conn: Any, base: RupaSettings) -> RupaSettings:
    return replace(
        base,
        base_url=base_url_of(conn) or base.base_url,
        client_id=(conn.login or "").strip() or base.client_id,
        client_secret=(conn.password or "").strip() or base.client_secret,
        api_token=extra_field(conn, RUPA_CONN_TYPE, "access_token") or base.api_token,
        network=network_from_connection(conn, RUPA_CONN_TYPE, "RUPA", base.network),
        result_origins=_origins(extra_of(conn).get("result_origins")) or base.result_origins,
    )


def _origins(value: Any) -> tuple[str, ...]:
    """The extra `result_origins`: a list, or one comma-separated string (RUPA_RESULT_ORIGINS)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(str(o).strip().rstrip("/") for o in items if str(o).strip())


def _is_not_found(exc: BaseException) -> bool:
    """Airflow's "no such connection" (its class lives in airflow.exceptions or airflow.sdk.exceptions)."""
    return any(cls.__name__ == "AirflowNotFoundException" for cls in type(exc).__mro__)


class _VendorHook(BaseHook):
    """What both Hooks share: reading their Connection, the form, the Test button."""

    conn_type: ClassVar[str]
    vendor: ClassVar[str]
    # settings-variable names in our messages -> the form's field names (the Test button's user
    # fills a form, not environment variables)
    field_names: ClassVar[dict[str, str]] = {}

    def __init__(self, conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    def connection(self) -> Any | None:
        """The Connection, or None when it does not exist (the environment's settings apply)."""
        try:
            return self.get_connection(self.conn_id)
        except Exception as exc:
            if not _is_not_found(exc):
                log.warning("could not read the Airflow Connection %r (%s); using the environment",
                            self.conn_id, type(exc).__name__)
            return None

    # Each Hook says how its Connection maps onto its settings and how a token is fetched.
    example_url: ClassVar[str] = ""

    def _from_connection(self, conn: Any, base: Any) -> Any:  # pragma: no cover - per Hook
        raise NotImplementedError

    def _env_base(self) -> Any:  # pragma: no cover - per Hook
        raise NotImplementedError

    def _empty_base(self) -> Any:  # pragma: no cover - per Hook
        raise NotImplementedError

    def _fetch_token(self, settings: Any) -> str:  # pragma: no cover - per Hook
        raise NotImplementedError

    def settings(self, base: Any = None) -> Any:
        """`base` (by default the environment's, etl.settings) overlaid with the Connection, or
        None when the Connection does not exist. Not validated yet."""
        conn = self.connection()
        return None if conn is None else self._from_connection(conn, base or self._env_base())

    def _existing(self) -> Any:
        from etl.errors import ConfigError

        conn = self.connection()
        if conn is None:
            raise ConfigError(f"the Airflow Connection {self.conn_id!r} does not exist")
        return conn

    def get_conn(self) -> Any:
        """The validated settings of this Connection."""
        return self._from_connection(self._existing(), self._env_base()).validated()

    def _check(self) -> str:
        from etl.errors import ConfigError

        conn = self._existing()
        if not base_url_of(conn):
            raise ConfigError(f"the API base URL is empty (e.g. {self.example_url})")
        return self._fetch_token(self._from_connection(conn, self._empty_base()))

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: (True, what worked) after the vendor accepted the credentials,
        (False, why not) otherwise. The sentence names no secret."""
        try:
            return True, self._check()
        except LabsyncError as exc:
            message = str(exc)
            for variable, field in self.field_names.items():
                message = message.replace(variable, field)
            return False, message
        except Exception as exc:  # a bug must not show a traceback (or a secret) in the UI
            log.exception("testing the %s connection failed", self.vendor)
            return False, f"testing the {self.vendor} connection failed unexpectedly ({type(exc).__name__})"


class LgcHook(_VendorHook):
    """LetsGetChecked: access key + secret key (OAuth client credentials) and the client id."""

    conn_name_attr = "lgc_conn_id"
    default_conn_name = "lgc_default"
    conn_type = LGC_CONN_TYPE
    hook_name = CONNECTION_FORMS[LGC_CONN_TYPE]["hook_name"]
    vendor = "LetsGetChecked"
    field_names = {"LGC_BASE_URL": "the API base URL", "LGC_CLIENT_ID": "the Client ID",
                   "LGC_ACCESS_KEY": "the Access key", "LGC_SECRET_KEY": "the Secret key",
                   "LGC_API_TOKEN": "the ready access token", "LGC_PROXY": "the extra `proxy`",
                   "LGC_CA_BUNDLE": "the extra `ca_bundle`", "LGC_CLIENT_CERT": "the extra `client_cert`",
                   "LGC_CLIENT_KEY": "the extra `client_key`", "LGC_TIMEOUT": "the extra `timeout`"}

    # Defined on each Hook itself: Airflow 3.1 reads them only from the class's own __dict__.
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return _form_widgets(cls.conn_type)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return _field_behaviour(cls.conn_type)

    def __init__(self, lgc_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(lgc_conn_id, **kwargs)
        self.lgc_conn_id = lgc_conn_id

    example_url = "https://api.letsgetchecked.com"

    def _from_connection(self, conn: Any, base: LgcSettings) -> LgcSettings:
        return lgc_from_connection(conn, base)

    def _env_base(self) -> LgcSettings:
        return Settings.from_env().lgc

    def _empty_base(self) -> LgcSettings:
        return LgcSettings()

    def _fetch_token(self, settings: LgcSettings) -> str:
        from etl.lgc.client import check_credentials

        return asyncio.run(check_credentials(settings, TEST_RETRY))


class RupaHook(_VendorHook):
    """Rupa Health: OAuth client id + secret (tokens live in the warehouse) or a ready token."""

    conn_name_attr = "rupa_conn_id"
    default_conn_name = "rupa_default"
    conn_type = RUPA_CONN_TYPE
    hook_name = CONNECTION_FORMS[RUPA_CONN_TYPE]["hook_name"]
    vendor = "Rupa"
    field_names = {"RUPA_BASE_URL": "the API base URL", "RUPA_CLIENT_ID": "the OAuth client ID",
                   "RUPA_CLIENT_SECRET": "the OAuth client secret",
                   "RUPA_API_TOKEN": "the ready access token", "RUPA_PROXY": "the extra `proxy`",
                   "RUPA_CA_BUNDLE": "the extra `ca_bundle`", "RUPA_CLIENT_CERT": "the extra `client_cert`",
                   "RUPA_CLIENT_KEY": "the extra `client_key`", "RUPA_TIMEOUT": "the extra `timeout`"}

    # Defined on each Hook itself: Airflow 3.1 reads them only from the class's own __dict__.
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return _form_widgets(cls.conn_type)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return _field_behaviour(cls.conn_type)

    def __init__(self, rupa_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(rupa_conn_id, **kwargs)
        self.rupa_conn_id = rupa_conn_id

    example_url = "https://api.rupahealth.com"

    def _from_connection(self, conn: Any, base: RupaSettings) -> RupaSettings:
        return rupa_from_connection(conn, base)

    def _env_base(self) -> RupaSettings:
        return Settings.from_env().rupa

    def _empty_base(self) -> RupaSettings:
        return RupaSettings()

    def _fetch_token(self, settings: RupaSettings) -> str:
        from etl.rupa.client import check_credentials

        return check_credentials(settings, TEST_RETRY)
