"""The provider description Airflow reads through the `apache_airflow_provider` entry point
(pyproject.toml), modelled on apache-airflow-providers-http. No Airflow import here: the
ProvidersManager calls `get_provider_info()` in every component, often just to list what exists.

The connection forms are declared twice over from ONE table (`CONNECTION_FORMS`):
- as `conn-fields` / `ui-field-behaviour` in the provider info, which Airflow >= 3.2 renders
  without importing the hooks (and prefers: hook-defined forms are deprecated there);
- as the hooks' `get_connection_form_widgets()` / `get_ui_field_behaviour()`, which Airflow 3.1
  calls (etl.airflow.hooks builds them from the same table).
"""

from __future__ import annotations

from typing import Any

PACKAGE = "labsync"  # must be the distribution's name: Airflow checks it

LGC_CONN_TYPE = "labsync-lgc"
RUPA_CONN_TYPE = "labsync-rupa"
LGC_HOOK = "etl.airflow.hooks.LgcHook"
RUPA_HOOK = "etl.airflow.hooks.RupaHook"

# The network settings both connection types carry in their extras (etl.settings.NetworkSettings),
# as Airflow's own HTTP provider does: an egress proxy, a private CA, a client certificate (mTLS).
NETWORK_FIELDS: dict[str, tuple[str, str, bool]] = {
    "proxy": ("Proxy URL (optional)", "e.g. http://proxy.example:3128. Empty: the workers' "
              "HTTP_PROXY / HTTPS_PROXY / NO_PROXY apply.", False),
    "ca_bundle": ("CA bundle path (optional)", "A PEM file of the CAs to trust (a TLS-inspecting "
                  "proxy's or a private CA). Empty: the system's.", False),
    "client_cert": ("Client certificate path (optional)", "A PEM client certificate for a vendor "
                    "or gateway that requires mutual TLS.", False),
    "client_key": ("Client key path (optional)", "The PEM private key of the client certificate, "
                   "unless it is in the same file.", False),
    "timeout": ("Timeout in seconds (optional)", "Connect/read/write timeout. Empty: "
                "LABSYNC_HTTP_TIMEOUT (30).", False),
}

# conn type -> hook class, display name, extra fields (name -> label, description, secret?),
# and how the standard fields are shown (hidden ones, relabelled ones, placeholders).
CONNECTION_FORMS: dict[str, dict[str, Any]] = {
    LGC_CONN_TYPE: {
        "hook": LGC_HOOK,
        "hook_name": "LetsGetChecked (labsync)",
        "fields": {
            "client_id": ("Client ID", "The 1-4 letter clientId LetsGetChecked gave you (it is "
                          "part of every order URL).", False),
            "access_token": ("Ready access token (optional)", "A bearer token to use instead of "
                             "the access and secret keys; it cannot be refreshed.", True),
            **NETWORK_FIELDS,
        },
        "behaviour": {
            "hidden_fields": ["schema", "port"],
            "relabeling": {"host": "API base URL", "login": "Access key", "password": "Secret key"},
            "placeholders": {"host": "https://api.letsgetchecked.com",
                             "login": "25 letters or digits", "password": "25 letters or digits",
                             "client_id": "ABCD", "extra": "{}"},
        },
    },
    RUPA_CONN_TYPE: {
        "hook": RUPA_HOOK,
        "hook_name": "Rupa Health (labsync)",
        "fields": {
            "access_token": ("Ready access token (optional)", "A bearer token to use instead of the "
                             "OAuth tokens `labsync rupa authorize` stores in the warehouse.", True),
            **NETWORK_FIELDS,
        },
        "behaviour": {
            "hidden_fields": ["schema", "port"],
            "relabeling": {"host": "API base URL", "login": "OAuth client ID",
                           "password": "OAuth client secret"},
            "placeholders": {"host": "https://api.rupahealth.com", "extra": "{}"},
        },
    },
}


def _conn_fields(fields: dict[str, tuple[str, str, bool]]) -> dict[str, dict]:
    out = {}
    for name, (label, description, secret) in fields.items():
        schema: dict[str, Any] = {"type": ["string", "null"]}
        if secret:
            schema["format"] = "password"
        out[name] = {"label": label, "description": description, "schema": schema}
    return out


def _behaviour(b: dict[str, Any]) -> dict[str, Any]:
    return {"hidden-fields": list(b["hidden_fields"]), "relabeling": dict(b["relabeling"]),
            "placeholders": dict(b["placeholders"])}


def get_provider_info() -> dict[str, Any]:
    """What Airflow lists: the two hooks and their connection types (with their forms)."""
    return {
        "package-name": PACKAGE,
        "name": "labsync",
        "description": "Rupa Health and LetsGetChecked connections for the labsync DAGs.",
        "hooks": [{"integration-name": "labsync", "python-modules": ["etl.airflow.hooks"]}],
        "connection-types": [
            {
                "connection-type": conn_type,
                "hook-class-name": form["hook"],
                "hook-name": form["hook_name"],
                "conn-fields": _conn_fields(form["fields"]),
                "ui-field-behaviour": _behaviour(form["behaviour"]),
            }
            for conn_type, form in CONNECTION_FORMS.items()
        ],
    }
