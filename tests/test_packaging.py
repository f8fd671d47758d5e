"""The wheel in an existing deployment: scripts/check-wheel.sh builds it, installs it into a
fresh venv beside the lowest supported Airflow (3.1.0) without moving Airflow's packages or
SQLAlchemy, runs `uv pip check`, `airflow dags list` (and `airflow dags test order_batches`
against the sandbox), then installs it alone and checks that a missing extra is named.

uv and its cache make this about a minute on an idle machine (the first run downloads Airflow)."""

from __future__ import annotations

import subprocess

from tests.helpers import REPO


def test_the_wheel_installs_beside_the_lowest_supported_airflow_with_pip_check_clean(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "check-wheel.sh"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    assert "apache-airflow==3.1.0 sqlalchemy==2." in said  # the lowest Airflow, on SQLAlchemy 2
    assert "pip check: All installed packages are compatible" in said
    assert "beside apache-airflow==3.0.6: refused up front" in said
    assert ("airflow dags list: labsync_retention, lgc_lifecycle, order_batches, rupa_checkout, rupa_extract; import errors: "
            "none; connection types: labsync-lgc, labsync-rupa (with their forms)") in said
    assert "airflow dags test order_batches: 12 orders accepted" in said
    assert "install the labsync[sandbox] extra" in said
    assert said.rstrip().endswith("ok")
