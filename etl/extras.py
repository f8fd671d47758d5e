"""Optional parts of labsync and the extra that installs each (pyproject.toml):

    labsync[server]   the webhook receiver (`labsync webhooks serve`): starlette + uvicorn
    labsync[sandbox]  the local vendor APIs (`labsync sandbox`, `make demo`, the tests): the same
    labsync[airflow]  Apache Airflow, for running the DAGs where Airflow is not installed yet

Airflow workers need none of them, so a worker image stays small and pip leaves the
deployment's web stack alone. A command whose extra is missing says which one to install
(exit 2), instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib.util

from etl.errors import ConfigError

WEB = ("starlette", "uvicorn")


def require(extra: str, what: str, modules: tuple[str, ...] = WEB) -> None:
    """ConfigError naming `labsync[extra]` when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what}: install the labsync[{extra}] extra (missing: "
                          f"{', '.join(missing)}): pip install 'labsync[{extra}]'")
