"""The labsync provider: the connection types `labsync-lgc` / `labsync-rupa` Airflow lists (and
the UI's form is built from), the Test button against the sandbox vendors over real HTTP, and the
tasks' settings read through the Hooks. Airflow runs in subprocesses with a temp AIRFLOW_HOME,
as in tests/test_dags.py; the sandbox runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from etl.settings import (
    SANDBOX_LGC_ACCESS_KEY,
    SANDBOX_LGC_CLIENT_ID,
    SANDBOX_LGC_SECRET_KEY,
    SANDBOX_RUPA_CLIENT_ID,
    SANDBOX_RUPA_CLIENT_SECRET,
)
from tests.helpers import REPO

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    """A bare AIRFLOW_HOME: listing providers and testing a Connection need no metadata DB."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LABSYNC_", "LGC_", "RUPA_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING", PYTHONPATH=str(REPO))
    return env


def probe(env: dict, *args: str):
    done = subprocess.run([sys.executable, "-m", "tests.airflow_probe", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, f"probe failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def test_providers_manager_lists_both_connection_types_and_hooks_with_their_forms(airflow_env):
    facts = probe(airflow_env, "providers")
    assert facts["providers"] == ["labsync"]
    assert facts["hooks"] == {
        "labsync-lgc": {"hook_class_name": "etl.airflow.hooks.LgcHook", "conn_id_attr": "lgc_conn_id",
                        "hook_name": "LetsGetChecked (labsync)", "package": "labsync", "testable": True},
        "labsync-rupa": {"hook_class_name": "etl.airflow.hooks.RupaHook", "conn_id_attr": "rupa_conn_id",
                         "hook_name": "Rupa Health (labsync)", "package": "labsync", "testable": True},
    }
    lgc, rupa = facts["ui"]["labsync-lgc"], facts["ui"]["labsync-rupa"]
    # the form: host/login/password relabelled, schema and port hidden, client id and token fields
    std = lgc["standard_fields"]
    assert (std["host"]["title"], std["login"]["title"], std["password"]["title"]) == (
        "API base URL", "Access key", "Secret key")
    assert std["port"]["hidden"] and std["url_schema"]["hidden"] and not std["host"]["hidden"]
    assert rupa["standard_fields"]["login"]["title"] == "OAuth client ID"
    assert rupa["standard_fields"]["password"]["title"] == "OAuth client secret"
    network = ["ca_bundle", "client_cert", "client_key", "proxy", "timeout"]  # the network extras, as Airflow's HTTP provider has
    assert sorted(lgc["extra_fields"]) == sorted(["access_token", "client_id", *network])
    assert lgc["extra_fields"]["proxy"]["schema"]["title"] == "Proxy URL (optional)"
    assert lgc["extra_fields"]["client_id"]["schema"]["title"] == "Client ID"
    assert "format" not in lgc["extra_fields"]["client_id"]["schema"]
    assert lgc["extra_fields"]["access_token"]["schema"]["format"] == "password"  # shown masked
    assert sorted(rupa["extra_fields"]) == sorted(["access_token", *network])
    assert rupa["extra_fields"]["access_token"]["schema"]["format"] == "password"


def test_the_hooks_build_the_wtforms_widgets_and_field_behaviour_airflow_3_1_reads():
    """Airflow 3.1 builds the form from the Hooks' own methods; both come from one table."""
    from etl.airflow.hooks import LgcHook, RupaHook
    from etl.airflow.provider import get_provider_info

    info = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}
    for hook in (LgcHook, RupaHook):
        behaviour = hook.get_ui_field_behaviour()
        declared = info[hook.conn_type]["ui-field-behaviour"]
        assert behaviour["hidden_fields"] == declared["hidden-fields"] == ["schema", "port"]
        assert behaviour["relabeling"] == declared["relabeling"]
    try:
        import flask_appbuilder  # noqa: F401
        import wtforms  # noqa: F401
    except ImportError:  # Airflow >= 3.2 without the FAB provider: the declarative fields serve
        with pytest.raises(ImportError):
            LgcHook.get_connection_form_widgets()
        return
    widgets = LgcHook.get_connection_form_widgets()  # pragma: no cover - only with FAB installed
    assert sorted(widgets) == ["access_token", "client_id"]


def _lgc(url, login=SANDBOX_LGC_ACCESS_KEY, password=SANDBOX_LGC_SECRET_KEY, **extra):
    return {"conn_type": "labsync-lgc", "host": url, "login": login, "password": password,
            "extra": json.dumps({"client_id": SANDBOX_LGC_CLIENT_ID, **extra})}


def _rupa(url, login=SANDBOX_RUPA_CLIENT_ID, password=SANDBOX_RUPA_CLIENT_SECRET, **extra):
    return {"conn_type": "labsync-rupa", "host": url, "login": login, "password": password,
            "extra": json.dumps(extra)}


def test_the_test_button_fetches_real_tokens_and_says_plainly_why_not(airflow_env, sandbox):
    bad_key, bad_secret = "W" * 25, "badsecretbadsecretbadsecr"
    good_token = sandbox.sandbox.rupa.mint_access_token()
    cases = [
        _lgc(sandbox.lgc_url),  # good keys: a token from the token endpoint
        _lgc(sandbox.lgc_url, password=bad_secret),  # refused keys
        _lgc(sandbox.lgc_url, login="short"),  # not a key at all: said before anything is sent
        _lgc(sandbox.lgc_url, access_token="not-a-token-the-sandbox-issued"),  # refused ready token
        {"conn_type": "labsync-lgc", "login": bad_key, "password": bad_secret},  # no base URL
        _rupa(sandbox.rupa_url),  # good client id and secret
        _rupa(sandbox.rupa_url, password="wrong-secret-value"),
        _rupa(sandbox.rupa_url, access_token=good_token),
        _rupa(sandbox.rupa_url, access_token="revokedtoken12345"),
        _lgc("http://127.0.0.1:9"),  # nothing listens there
    ]
    results = probe(airflow_env, "testconn", json.dumps(cases))
    lgc_ok, lgc_bad, lgc_short, lgc_token, lgc_nohost, rupa_ok, rupa_bad, rupa_token, rupa_badtoken, down = results

    assert lgc_ok["ok"] is True, lgc_ok
    assert "issued a token" in lgc_ok["message"] and SANDBOX_LGC_CLIENT_ID in lgc_ok["message"]
    assert lgc_bad == {"ok": False, "message": lgc_bad["message"]}
    assert "refused" in lgc_bad["message"] and "HTTP 401" in lgc_bad["message"]
    assert "the Access key" in lgc_bad["message"] and "LGC_ACCESS_KEY" not in lgc_bad["message"]
    assert lgc_short["ok"] is False and "the Access key must be 25 letters or digits" in lgc_short["message"]
    assert lgc_token["ok"] is False and "refused the access token" in lgc_token["message"]
    assert lgc_nohost["ok"] is False and "base URL is empty" in lgc_nohost["message"]
    assert rupa_ok["ok"] is True and "accepted the client id and secret" in rupa_ok["message"]
    assert rupa_bad["ok"] is False and "refused the client id and secret" in rupa_bad["message"]
    assert rupa_token["ok"] is True and "accepted the access token" in rupa_token["message"]
    assert rupa_badtoken["ok"] is False and "refused the access token" in rupa_badtoken["message"]
    assert down["ok"] is False and "LetsGetChecked" in down["message"]
    for result in results:  # one sentence, never a secret
        said = result["message"]
        assert "\n" not in said and "Traceback" not in said
        for secret in (SANDBOX_LGC_SECRET_KEY, SANDBOX_LGC_ACCESS_KEY, bad_secret, bad_key, good_token,
                       SANDBOX_RUPA_CLIENT_SECRET, "wrong-secret-value", "revokedtoken12345",
                       "not-a-token-the-sandbox-issued"):
            assert secret not in said, said


def test_tasks_read_their_vendor_settings_through_the_hooks(monkeypatch):
    """airflow_settings: the Connections (any type, plain or prefixed extras) overlay the
    environment; the same LgcSettings/RupaSettings objects, checked by the same validated()."""
    from etl.airflow.tasks import airflow_settings

    for name in ("LGC_BASE_URL", "LGC_CLIENT_ID", "RUPA_BASE_URL", "RUPA_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LGC_CONCURRENCY", "3")  # the environment still supplies the rest
    monkeypatch.setenv("AIRFLOW_CONN_LGC_DEFAULT", json.dumps({
        "conn_type": "labsync-lgc", "host": "api.lgc.example", "login": "A" * 25, "password": "B" * 25,
        "extra": {"client_id": "ABCD"}}))
    monkeypatch.setenv("AIRFLOW_CONN_RUPA_DEFAULT", json.dumps({  # an older untyped Connection
        "conn_type": "http", "host": "https://api.rupa.example/", "extra": {"extra__labsync-rupa__access_token": "tok.en"}}))
    settings = airflow_settings(require=("lgc", "rupa"))
    lgc = settings.lgc.validated()
    assert (lgc.base_url, lgc.client_id, lgc.access_key, lgc.concurrency) == ("https://api.lgc.example", "ABCD", "A" * 25, 3)
    assert (settings.rupa.base_url, settings.rupa.api_token) == ("https://api.rupa.example", "tok.en")

    from etl.airflow.hooks import LgcHook

    assert LgcHook().get_conn() == lgc  # the Hook hands out the very same settings object


def test_the_clients_and_the_provider_info_import_without_airflow():
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'airflow' or name.startswith('airflow.'):\n"
               "            raise ImportError('no airflow here')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import etl.lgc.client, etl.rupa.client, etl.settings, etl.airflow.tasks, etl.cli\n"
               "from etl.airflow.provider import get_provider_info\n"
               "print(sorted(c['connection-type'] for c in get_provider_info()['connection-types']))\n"
               "from etl.settings import Settings\n"
               "from etl.errors import ConfigError\n"
               "from etl.airflow.tasks import airflow_settings\n"
               "try:\n    airflow_settings()\n"
               "except ConfigError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["['labsync-lgc', 'labsync-rupa']",
                                        "Airflow is not installed; use Settings.from_env()"]
