"""Issue 10, point 5 (secrets): Rupa's access and refresh tokens are encrypted at rest in
`oauth_tokens` with Fernet (MultiFernet for rotation). The key comes from LABSYNC_FERNET_KEY,
the Airflow Variable `labsync_fernet_secret`, or, for an embedded SQLite warehouse only, a
private key file beside the database created on first use."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl.cli import main
from etl.errors import ConfigError
from etl.extract.streams import extract_stream
from etl.warehouse import oauth_tokens, rupa_patients
from tests.rupa_support import authorize, cli_env, count


@pytest.fixture
def rupa(sandbox):
    return sandbox.sandbox.rupa


def _raw(engine) -> dict:
    with engine.connect() as conn:
        row = conn.execute(sa.select(oauth_tokens)).mappings().one()
    return dict(row)


def _secrets_in(raw: dict, *secrets: str) -> list[str]:
    text = " ".join(str(v) for v in raw.values())
    return [s for s in secrets if s and s in text]


def test_tokens_are_encrypted_at_rest_and_still_work(engine, settings, rupa):
    tokens = authorize(engine, settings)
    raw = _raw(engine)
    assert _secrets_in(raw, tokens.access_token, tokens.refresh_token) == []
    assert raw["access_token"].startswith("fernet:") and raw["refresh_token"].startswith("fernet:")

    assert extract_stream(engine, settings, "patients").inserted == 50
    rupa.expire_access_tokens()  # the next run refreshes; the rotated refresh token is stored encrypted
    assert extract_stream(engine, settings, "patients").unchanged == 50
    assert _secrets_in(_raw(engine), *rupa.refresh_tokens()) == []


def test_a_key_that_cannot_decrypt_the_row_is_a_plain_config_error(engine, settings, rupa, monkeypatch, capsys):
    authorize(engine, settings)
    other = replace(settings, fernet_key=Fernet.generate_key().decode())
    with pytest.raises(ConfigError) as info:
        extract_stream(engine, other, "patients")
    assert "LABSYNC_FERNET_KEY" in str(info.value)

    cli_env(monkeypatch, settings)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", other.fernet_key)
    assert main(["extract", "patients", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labsync: ") and "LABSYNC_FERNET_KEY" in err and err.count("\n") == 1


def test_rotating_the_key_re_encrypts_every_row(engine, settings, rupa, monkeypatch, capsys):
    old = settings.fernet_key
    new = Fernet.generate_key().decode()
    tokens = authorize(engine, settings)
    before = _raw(engine)

    cli_env(monkeypatch, settings)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", f"{new},{old}")
    assert main(["db", "rotate-key"]) == 0
    assert "1 token row" in capsys.readouterr().out
    after = _raw(engine)
    assert after["access_token"] != before["access_token"]
    assert Fernet(new.encode()).decrypt(after["access_token"].removeprefix("fernet:").encode()).decode() == tokens.access_token

    monkeypatch.setenv("LABSYNC_FERNET_KEY", new)  # the old key can go
    assert main(["extract", "patients", "--no-progress"]) == 0
    monkeypatch.setenv("LABSYNC_FERNET_KEY", old)
    assert main(["extract", "patients", "--no-progress"]) == 2


def test_order_bodies_waiting_in_the_outbox_are_sealed_and_follow_a_key_rotation(
        engine, settings, sandbox, monkeypatch, capsys):
    """The outbox keeps the patient's data of rows not sent yet: sealed, never as text."""
    from etl.orders.load import load_rows
    from etl.warehouse import lgc_outbox
    from tests.test_lgc_support import cli_env as lgc_env
    from tests.test_lgc_support import fast, order_row, outbox_rows

    lgc = sandbox.sandbox.lgc
    lgc.forced["ORD-00001"] = 503  # never goes through: its body stays in the outbox
    load_rows(engine, fast(settings), [order_row(1, first_name="Zelda", last_name="Quist"), order_row(2)])
    rows = outbox_rows(engine)
    assert rows["ORD-00001"]["outcome"] == "failed" and rows["ORD-00002"]["body"] is None
    sealed = rows["ORD-00001"]["body"]
    assert sealed.startswith("fernet:") and "Zelda" not in sealed and "Quist" not in sealed

    new = Fernet.generate_key().decode()
    for key, value in lgc_env(settings).items():
        if key.startswith(("LGC_", "LABSYNC_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("LABSYNC_FERNET_KEY", f"{new},{settings.fernet_key}")
    assert main(["db", "rotate-key"]) == 0
    assert "and 1 waiting order body" in capsys.readouterr().out
    with engine.connect() as conn:
        resealed = conn.execute(sa.select(lgc_outbox.c.body).where(lgc_outbox.c.client_order_id == "ORD-00001")).scalar_one()
    assert resealed != sealed
    assert "Zelda" in Fernet(new.encode()).decrypt(resealed.removeprefix("fernet:").encode()).decode()

    lgc.forced.clear()
    monkeypatch.setenv("LABSYNC_FERNET_KEY", new)  # the old key can go: the retry reads the new seal
    assert main(["retry"]) == 0
    assert lgc.orders["ORD-00001"]["body"]["patientInfo"]["firstName"] == "Zelda"
    assert outbox_rows(engine)["ORD-00001"]["body"] is None  # settled: the body is gone


def test_a_new_key_is_printed_ready_to_use(capsys):
    assert main(["db", "new-key"]) == 0
    key = capsys.readouterr().out.strip()
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"


def test_plain_rows_of_an_older_labsync_are_encrypted_on_first_use(engine, settings, rupa):
    tokens = authorize(engine, settings)
    with engine.begin() as conn:  # as labsync stored them before tokens were encrypted
        conn.execute(sa.update(oauth_tokens).values(access_token=tokens.access_token,
                                                    refresh_token=tokens.refresh_token))
    assert extract_stream(engine, settings, "patients").inserted == 50
    raw = _raw(engine)
    assert raw["access_token"].startswith("fernet:") and _secrets_in(raw, tokens.access_token, tokens.refresh_token) == []


def test_the_embedded_sqlite_warehouse_gets_a_private_key_file(sandbox, tmp_path, rupa):
    from etl import warehouse
    from etl.settings import Settings
    from tests.conftest import FAST_RETRY, migrated

    db = tmp_path / "embedded" / "labsync.db"
    base = Settings()
    settings = replace(base, warehouse_url=migrated(f"sqlite:///{db}"), retry=FAST_RETRY,
                       rupa=replace(base.rupa, base_url=sandbox.rupa_url))
    assert settings.fernet_key is None
    engine = warehouse.connect(settings.warehouse_url)
    tokens = authorize(engine, settings)
    key_file = db.with_name("labsync.db.key")
    assert key_file.exists() and stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert _secrets_in(_raw(engine), tokens.access_token, tokens.refresh_token) == []
    assert extract_stream(engine, settings, "patients").inserted == 50  # a later run reads it back
    assert count(engine, rupa_patients) == 50


@pytest.mark.postgres
def test_a_server_warehouse_without_a_key_refuses_before_the_code_is_spent(pg_admin_url, sandbox, rupa):
    from etl import warehouse
    from etl.rupa.auth import exchange_code
    from etl.settings import Settings
    from tests.conftest import FAST_RETRY, migrated
    from tests.pgserver import create_database

    base = Settings()
    settings = replace(base, warehouse_url=migrated(create_database(pg_admin_url)), retry=FAST_RETRY,
                       rupa=replace(base.rupa, base_url=sandbox.rupa_url))
    engine = warehouse.connect(settings.warehouse_url)
    with pytest.raises(ConfigError) as info:
        exchange_code(engine, settings, rupa.issue_code())
    assert "LABSYNC_FERNET_KEY" in str(info.value)
    assert rupa.stats["grant:authorization_code"] == 0


def test_airflow_tasks_read_the_key_from_a_variable(monkeypatch):
    from etl.airflow.tasks import airflow_settings

    key = Fernet.generate_key().decode()
    monkeypatch.delenv("LABSYNC_FERNET_KEY", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_LABSYNC_FERNET_SECRET", key)
    assert airflow_settings().fernet_key == key
    monkeypatch.setenv("LABSYNC_FERNET_KEY", "from-env")  # the environment wins, as for every setting
    assert airflow_settings().fernet_key == "from-env"
