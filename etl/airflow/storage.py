"""The inbox's filesystem from an Airflow Connection: `s3://CONN@bucket/prefix` (Airflow's
ObjectStoragePath syntax) or LABSYNC_INBOX_CONN_ID. etl.intake.storage stays free of Airflow: this
module hands it the opener when it is imported (the CLI and the DAG tasks import it). Airflow
itself is imported only when a connection id is actually used."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from etl.errors import ConfigError
from etl.intake import storage


def connection_filesystem(url: str, conn_id: str, shown: str) -> tuple[Any, str]:
    """(the fsspec filesystem Airflow gives for `conn_id`, the path inside it)."""
    try:
        from airflow.sdk import ObjectStoragePath
    except ImportError:
        raise ConfigError(f"inbox {shown}: a connection id ({conn_id}) needs Airflow installed; "
                          "without Airflow give the URL alone and credentials in the environment") from None
    try:
        path = ObjectStoragePath(url, conn_id=conn_id)
        fs = path.fs
    except ValueError as exc:  # no filesystem registered for the scheme
        raise ConfigError(f"inbox {shown}: Airflow has no filesystem for {urlsplit(url).scheme}:// "
                          f"({exc}); install its provider on the workers") from None
    return fs, path.path


storage.use_connections(connection_filesystem)
