"""Issue 10, point 7: the smaller hostile inputs, each with a plain, bounded behaviour.
- a token answer without a usable access_token never puts `Bearer None` (or a header-breaking
  token) on the wire;
- a file name with control characters cannot forge a log line;
- odd file names in the inbox are processed or reported, never silently ignored;
- 10,000 unknown columns give a bounded one-line reason; a data row in place of the header is
  not echoed back."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from starlette.responses import JSONResponse, Response

from etl import logs
from etl.errors import ApiError, UnusableInputError
from etl.orders.load import load_rows
from tests.test_lgc_support import csv_row, fast, ledger, order_row, write_csv

TOKEN_ANSWERS = [
    ("null", lambda: JSONResponse({"access_token": None, "expires_in": 3600})),
    ("missing", lambda: JSONResponse({"token_type": "Bearer", "expires_in": 3600})),
    ("empty", lambda: JSONResponse({"access_token": "", "expires_in": 3600})),
    ("a number", lambda: JSONResponse({"access_token": 12345, "expires_in": 3600})),
    ("a list", lambda: JSONResponse({"access_token": ["a"], "expires_in": 3600})),
    ("a space", lambda: JSONResponse({"access_token": "abc def", "expires_in": 3600})),
    ("header injection", lambda: JSONResponse({"access_token": "abc\r\nX-Evil: 1", "expires_in": 3600})),
    ("non-ascii", lambda: JSONResponse({"access_token": "tökén", "expires_in": 3600})),
    ("not json", lambda: Response("<html>login</html>", media_type="text/html")),
    ("a json string", lambda: JSONResponse("token")),
]


@pytest.mark.parametrize("name,answer", TOKEN_ANSWERS, ids=[c[0] for c in TOKEN_ANSWERS])
def test_an_unusable_lgc_token_answer_is_a_plain_error_and_nothing_is_sent(lite_engine, lite_settings, sandbox, name, answer):
    engine, settings = lite_engine, lite_settings
    lgc = sandbox.sandbox.lgc
    lgc.token_answer = lambda request: answer()
    with pytest.raises(ApiError) as info:
        load_rows(engine, fast(settings), [order_row(1)])
    message = str(info.value)
    assert "access token" in message and "None" not in message and "\n" not in message
    assert sandbox.sandbox.paths("PUT") == [] and ledger(engine) == {}


@pytest.mark.parametrize("name,answer", TOKEN_ANSWERS, ids=[c[0] for c in TOKEN_ANSWERS])
def test_an_unusable_rupa_token_answer_is_a_plain_error_and_nothing_is_stored(lite_engine, lite_settings, sandbox, name, answer):
    engine, settings = lite_engine, lite_settings
    import sqlalchemy as sa

    from etl.rupa.auth import exchange_code

    rupa = sandbox.sandbox.rupa
    rupa.token_answer = lambda request: answer()
    with pytest.raises(ApiError) as info:
        exchange_code(engine, settings, "a-code")
    assert "access token" in str(info.value) and "None" not in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM oauth_tokens")).scalar_one() == 0

ODD_NAMES = ["..csv", ".hidden.csv", "ORDERS.CSV", "orders.csv ", "x y.csv", "a\nb.csv", "tab\tname.csv",
             "\u202egnp.csv", "notes.txt", "orders.csv.part", "mine.rejects.csv"]


@pytest.mark.parametrize("name", ODD_NAMES, ids=repr)
def test_an_odd_file_name_is_processed_or_reported_never_silently_ignored(lite_settings, sandbox, lite_engine, name, caplog):
    settings, engine = lite_settings, lite_engine
    from etl.orders import inbox

    caplog.set_level(logging.INFO)
    box = settings.inbox
    box.mkdir(parents=True)
    write_csv(box / name, [csv_row(1)])
    outcomes = inbox.run_once(engine, replace(settings, inbox_settle_seconds=0.0)).outcomes
    names = [o["name"] for o in outcomes]
    if name.rstrip().lower().endswith(".csv") and not name.endswith(".rejects.csv"):
        assert len(outcomes) == 1 and outcomes[0]["status"] == "loaded", (names, outcomes)
        assert not (box / name).exists()
    else:
        assert outcomes == []
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "not a batch" in r.getMessage()]
        assert warned and logs.escape_controls(name) in warned[0].getMessage()
        assert (box / name).exists()  # left where it is for a person to look at


def test_a_file_name_cannot_forge_a_log_line(lite_settings, sandbox, lite_engine, caplog):
    settings, engine = lite_settings, lite_engine
    from etl.orders import inbox

    logs.configure()
    caplog.set_level(logging.INFO)
    forged = "evil\n2030-01-01 00:00:00,000 ERROR etl.orders.load: forged\r\x1b[2K.csv"
    box = settings.inbox
    box.mkdir(parents=True)
    write_csv(box / forged, [csv_row(1)])
    (outcome,) = inbox.run_once(engine, replace(settings, inbox_settle_seconds=0.0)).outcomes
    assert outcome["status"] == "loaded"
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("etl")]
    mentioning = [m for m in messages if "forged" in m]
    assert mentioning, messages
    for m in messages:
        assert not any(c in m for c in "\n\r\x1b"), repr(m)
    assert any("evil\\n2030-01-01" in m for m in mentioning)


def test_ten_thousand_unknown_columns_give_a_bounded_reason(tmp_path):
    from etl.intake.validate import CsvValidation

    columns = list(csv_row(1)) + [f"extra_{i}" for i in range(10_000)]
    path = write_csv(tmp_path / "wide.csv", [csv_row(1)], columns=columns)
    with pytest.raises(UnusableInputError) as info:
        CsvValidation(path)
    message = str(info.value)
    assert len(message) < 400 and "\n" not in message
    assert "'extra_0'" in message and "and 9,995 more" in message


def test_a_very_long_unknown_column_name_is_cut_in_the_reason(tmp_path):
    from etl.intake.validate import CsvValidation

    columns = list(csv_row(1)) + ["z" * 100_000]
    path = write_csv(tmp_path / "long.csv", [csv_row(1)], columns=columns)
    with pytest.raises(UnusableInputError) as info:
        CsvValidation(path)
    assert len(str(info.value)) < 400


def test_a_data_row_in_place_of_the_header_is_not_echoed(tmp_path):
    from etl.intake.validate import CsvValidation

    path = tmp_path / "noheader.csv"
    path.write_text("ORD-1,Health4All,P1,Zelda,Fitzgerald,zelda@example.org,+1,5550100001\n", encoding="utf-8")
    with pytest.raises(UnusableInputError) as info:
        CsvValidation(path)
    message = str(info.value)
    assert "header" in message
    for phi in ("Zelda", "Fitzgerald", "zelda@example.org", "5550100001"):
        assert phi not in message
