"""Flagged lab observations as an event (issue 26), on real Airflow: the lgc_lifecycle DAG's
fetch_results task puts the flagged observations not reported yet into its lgc_results asset
event's extras (ids, code, interpretation: never a value), each once."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.warehouse.tables import lab_observations
from tests.conftest import migrated
from tests.test_dags import airflow_env, probe, sandboxes  # noqa: F401  (module-scoped fixtures)

pytestmark = pytest.mark.airflow


def test_fetch_results_reports_flagged_observations_in_its_asset_event(airflow_env, sandboxes, tmp_path):  # noqa: F811
    from etl.orders.load import load_rows
    from etl.settings import LgcSettings, Settings
    from tests.test_lgc_support import order_row

    url = migrated(f"sqlite:///{tmp_path / 'warehouse.db'}")
    engine = warehouse.connect(url)
    settings = Settings(warehouse_url=url, lgc=LgcSettings(base_url=sandboxes.lgc_url, rate_limit=0))
    assert load_rows(engine, settings, [order_row(i) for i in range(3)]).counts == {"accepted": 3}
    sb = sandboxes.sandbox.lgc.lifecycle
    for coid in ("ORD-00000", "ORD-00001", "ORD-00002"):
        sb.advance(coid, to="ResultsAvailable")
    extra = dict(LABSYNC_WAREHOUSE_URL=url, LGC_BASE_URL=sandboxes.lgc_url, LABSYNC_RETRY_INITIAL_WAIT="0.01",
                 LABSYNC_INBOX=str(tmp_path / "inbox"), LABSYNC_RESULTS_FLAG_LEVEL="abnormal",
                 LABSYNC_TRACK_STALE_MINUTES="0")
    result = probe(airflow_env, "test", "lgc_lifecycle", extra=extra)
    assert result["state"] == "success", result
    with engine.connect() as conn:
        flagged = conn.execute(sa.select(lab_observations.c.id, lab_observations.c.value, lab_observations.c.notified_at)
                               .where(lab_observations.c.current.is_(True),
                                      lab_observations.c.interpretation.in_(("abnormal", "critical")))).all()
    (event,) = [e for e in result["asset_events"] if e["asset"] == "lgc_results"]
    reported = event["extra"].get("flagged_observations", [])
    assert result["returned"]["fetch_results"]["flagged"] == len(reported) == len(flagged)
    assert flagged, "the sandbox's panels should hold a value out of range"
    assert {r["observation_id"] for r in reported} == {f.id for f in flagged}
    assert all(f.notified_at is not None for f in flagged)
    text = json.dumps(reported)
    assert all(f.value not in text.split('"') for f in flagged)  # ids and codes, no value

    again = probe(airflow_env, "test", "lgc_lifecycle", extra=extra)  # reported once
    (event,) = [e for e in again["asset_events"] if e["asset"] == "lgc_results"]
    assert "flagged_observations" not in event["extra"]
