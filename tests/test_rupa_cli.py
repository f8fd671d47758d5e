"""`labsync extract` and `labsync rupa authorize` through `etl.cli.main`: exit codes and the one
line a user reads on stderr (revoked token, not authorized, bad configuration)."""

from __future__ import annotations

import io

import httpx
import pytest

from etl.cli import main
from etl.rupa.auth import TokenStore
from etl.warehouse import rupa_lab_tests, rupa_patients
from tests.rupa_support import authorize, cli_env, count, state_of


@pytest.fixture
def rupa(sandbox):
    return sandbox.sandbox.rupa


def test_extract_all_prints_one_summary_line_per_stream(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    authorize(engine, settings)
    assert main(["extract", "all"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("patients: 50 inserted, 0 updated, 0 unchanged, 0 marked deleted")
    assert out[1].startswith("lab_tests: 20 inserted")
    assert count(engine, rupa_patients) == 50 and count(engine, rupa_lab_tests) == 20

    assert main(["extract", "lab-tests", "--no-progress"]) == 0
    assert "lab_tests: 0 inserted, 0 updated, 20 unchanged" in capsys.readouterr().out


def test_a_revoked_token_is_a_clear_one_line_error_with_exit_code_2(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    tokens = authorize(engine, settings)
    rupa.revoke_all()  # the practitioner disconnected labsync in Rupa

    code = main(["extract", "patients", "--no-progress"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("labsync: ")
    assert "revoked" in err and "labsync rupa authorize" in err
    assert "Traceback" not in err
    assert tokens.access_token not in err and tokens.refresh_token not in err
    state = state_of(engine, "patients")
    assert state["status"] == "failed" and "labsync rupa authorize" in state["error"]


def test_not_authorized_yet_exits_2(engine, settings, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    assert main(["extract", "patients", "--no-progress"]) == 2
    assert "labsync rupa authorize" in capsys.readouterr().err


def test_a_refused_api_token_exits_2(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    monkeypatch.setenv("RUPA_API_TOKEN", "not-a-token-rupa-issued")
    assert main(["extract", "patients", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "RUPA_API_TOKEN" in err and "not-a-token-rupa-issued" not in err


def test_a_ready_api_token_works_without_oauth(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    monkeypatch.setenv("RUPA_API_TOKEN", rupa.mint_access_token())
    assert main(["extract", "patients", "--no-progress"]) == 0
    assert count(engine, rupa_patients) == 50


def test_bad_configuration_exits_2(engine, settings, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    monkeypatch.setenv("RUPA_PAGE_SIZE", "0")
    assert main(["extract", "patients"]) == 2
    assert "RUPA_PAGE_SIZE" in capsys.readouterr().err
    monkeypatch.setenv("RUPA_PAGE_SIZE", "10")
    monkeypatch.setenv("RUPA_BASE_URL", "https://api-sandbox.rupahealth.com")  # no credentials for it
    assert main(["extract", "patients"]) == 2
    assert "RUPA_CLIENT_ID" in capsys.readouterr().err


def _consent_redirect(out: str) -> str:
    url = next(line.strip() for line in out.splitlines() if "/oauth/authorize?" in line)
    response = httpx.get(url, follow_redirects=False)  # the practitioner approves in the browser
    return response.headers["location"]


def test_authorize_takes_the_redirected_url_and_stores_the_tokens(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    # interactive: the command prints the URL, then reads what the user pastes
    pasted: list[str] = []

    class Stdin(io.StringIO):
        def readline(self, *a):
            if not pasted:
                pasted.append(_consent_redirect(capsys.readouterr().out))
            return pasted[0] + "\n"

    monkeypatch.setattr("sys.stdin", Stdin())
    assert main(["rupa", "authorize"]) == 0
    out = capsys.readouterr().out
    assert "tokens stored in the warehouse" in out
    stored = TokenStore.for_settings(engine, settings).load()
    assert stored is not None and stored.refresh_token in rupa.refresh_tokens()
    assert stored.access_token not in out and stored.refresh_token not in out
    assert main(["extract", "patients", "--no-progress"]) == 0


def test_authorize_with_a_used_code_exits_2(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings)
    code = rupa.issue_code(settings.rupa.redirect_uri)
    assert main(["rupa", "authorize", "--code", code]) == 0
    capsys.readouterr()
    assert main(["rupa", "authorize", "--code", code]) == 2  # codes are single-use
    err = capsys.readouterr().err
    assert "authorization code" in err and code not in err
