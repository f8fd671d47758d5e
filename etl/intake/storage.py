"""Where the inbox lives: a local folder or any fsspec URL (`s3://bucket/prefix`, `gs://…`,
`sftp://…`), behind one small `Store` so the inbox code never asks which.

    store = open_store(settings.inbox, conn_id=settings.inbox_conn_id)
    store.files()                          # the files directly in the folder, fresh each time
    with store.local_copy("orders.csv") as path: ...     # a local file to validate
    store.put(local_report, "orders.rejects.csv"); store.copy(a, b); store.delete(a)

Credentials:
- A connection id (`s3://aws_default@bucket/prefix`, Airflow's ObjectStoragePath syntax, or the
  setting LABSYNC_INBOX_CONN_ID) goes through `airflow.sdk.ObjectStoragePath` (etl.airflow.storage), so the filesystem
  comes from an Airflow Connection (the workers need the scheme's provider, e.g.
  apache-airflow-providers-amazon for s3://).
- Otherwise fsspec (`fsspec.core.url_to_fs`) with the environment's credentials: for s3:// the
  standard AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL
  for an S3-compatible store (also passed to s3fs explicitly, for botocore versions that do not
  read it).

Object stores have no atomic rename and no folders: nothing here relies on either. Who owns a
file is decided in the warehouse (etl.intake.records); a move is a copy then a delete, made
safe to repeat by the caller (etl.intake.inbox.move). Listings are never served from fsspec's
cache, since other runs change the folder between two looks.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from etl.errors import ConfigError, LabsyncError, StorageUnavailable

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# schemes whose stores have no real folders (a "folder" is a key prefix) and where a URL's
# user part can only be an Airflow connection id
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
# the exceptions' packages of the usual fsspec backends: their errors are the store's, not bugs
_BACKEND_PACKAGES = frozenset({"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure",
                               "paramiko", "sshfs", "asyncssh", "aiohttp"})


@dataclass(frozen=True)
class Entry:
    """One file in a folder of the store."""

    name: str  # its name in the folder
    size: int
    mtime: float  # seconds since the epoch (for settling: a file still being copied in)


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def display(location: str | Path) -> str:
    """The location as shown in messages: a password in the URL never is."""
    text = str(location)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        return parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}").geturl()
    return text


def _store_error(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _BACKEND_PACKAGES


@dataclass(frozen=True)
class Store:
    """A folder of a filesystem: `fs` (fsspec) and `root`, the folder's path in it (no
    protocol). Paths given to the methods are relative to the root, `/`-separated."""

    fs: AbstractFileSystem
    root: str
    url: str  # for messages (no password)

    # ---- names ------------------------------------------------------------------------------
    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def url_of(self, relative: str) -> str:
        """Where a file is, for a person or XCom: a local path, or the store's URL of it."""
        if self.is_local:
            return self.path(relative)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path(relative)}"

    def sub(self, relative: str) -> Store:
        """The store rooted at a subfolder (the intents inbox is `intents/` of the inbox)."""
        return Store(self.fs, self.path(relative), f"{self.url.rstrip('/')}/{relative}")

    @property
    def is_local(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols or "local" in protocols

    @property
    def has_folders(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return not OBJECT_STORES.intersection(protocols)

    # ---- looking ----------------------------------------------------------------------------
    def files(self, folder: str = "") -> list[Entry]:
        """The files directly in `folder` (sub-folders left out), listed afresh."""
        where = self.path(folder)
        with self._errors():
            self.fs.invalidate_cache(where)
            try:
                found = self.fs.ls(where, detail=True)
            except FileNotFoundError:  # an empty prefix on an object store
                return []
        out = []
        for info in found:
            if info.get("type") != "file":
                continue
            out.append(Entry(posixpath.basename(info["name"].rstrip("/")), int(info.get("size") or 0),
                             self._mtime(info)))
        return out

    def _mtime(self, info: dict) -> float:
        for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
            value = info.get(key)
            if isinstance(value, datetime):
                return value.timestamp()
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        with self._errors():
            return self.fs.modified(info["name"]).timestamp()

    def exists(self, relative: str) -> bool:
        where = self.path(relative)
        with self._errors():
            self._fresh(where)
            return bool(self.fs.exists(where))

    def sha256(self, relative: str) -> str:
        """sha256 of the file's bytes, streamed (FileNotFoundError if it is gone)."""
        import hashlib

        digest = hashlib.sha256()
        with self.open(relative, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    # ---- reading and writing ----------------------------------------------------------------
    def _fresh(self, path: str) -> None:
        """Forget what fsspec remembers of the folder: another run may have changed it."""
        self.fs.invalidate_cache(posixpath.dirname(path))

    @contextlib.contextmanager
    def open(self, relative: str, mode: str = "rb", **kw) -> Iterator[Any]:
        with self._errors():
            self._fresh(self.path(relative))
        with self._errors(), self.fs.open(self.path(relative), mode, **kw) as f:
            yield f

    def read_text(self, relative: str) -> str:
        with self.open(relative, "rb") as f:
            return f.read().decode("utf-8")

    def write_text(self, relative: str, text: str) -> str:
        """Write a whole file (a local one through a temporary name, so a reader never sees half
        of it; an object store's PUT is whole by itself)."""
        data = text.encode("utf-8")
        if self.is_local:
            target = Path(self.path(relative))
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        else:
            with self.open(relative, "wb") as f:
                f.write(data)
        return self.path(relative)

    def put(self, local: Path, relative: str) -> None:
        """Upload a local file (a report written in a temporary folder) to `relative`."""
        with self._errors():
            self.fs.put_file(str(local), self.path(relative))

    @contextlib.contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        """A local path to read the file from: the file itself on a local store, otherwise a
        copy in a temporary folder removed afterwards (FileNotFoundError if the file is gone)."""
        if self.is_local:
            yield Path(self.path(relative))
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="labsync-") as tmp:
            local = Path(tmp) / posixpath.basename(relative)
            with self._errors():
                self._fresh(self.path(relative))
                self.fs.get_file(self.path(relative), str(local))
            yield local

    def copy(self, src: str, dst: str) -> None:
        """Copy within the store (server-side on object stores); FileNotFoundError if src is gone."""
        with self._errors():
            if self.has_folders:
                self.fs.makedirs(posixpath.dirname(self.path(dst)), exist_ok=True)
            self._fresh(self.path(src))
            self.fs.copy(self.path(src), self.path(dst))

    def delete(self, relative: str) -> bool:
        """Remove a file; False if it was not there (deleting twice is fine)."""
        with self._errors():
            try:
                self.fs.rm_file(self.path(relative))
            except FileNotFoundError:
                return False
        return True

    def ensure(self, *folders: str) -> Store:
        """Make the folders where a store has folders; on an object store, check the bucket is
        there (labsync never creates buckets: their region and policy are the deployment's)."""
        with self._errors():
            if self.has_folders:
                for folder in ("", *folders):
                    self.fs.makedirs(self.path(folder), exist_ok=True)
            else:
                bucket = self.root.split("/", 1)[0]
                try:  # not fs.exists(): it answers False when the store cannot be reached at all
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise StorageUnavailable(f"inbox {self.url}: the bucket {bucket!r} does not exist "
                                             "(create it, or fix LABSYNC_INBOX)") from None
        return self

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except LabsyncError:
            raise
        except Exception as exc:
            if _store_error(exc):
                raise StorageUnavailable(
                    f"inbox {self.url}: the store refused or could not be reached ({type(exc).__name__}); "
                    "check LABSYNC_INBOX and its credentials") from exc
            raise


def _conn_id_of(url: str) -> tuple[str, str | None]:
    """(URL without a connection id, the id): `s3://aws_default@bucket/p` -> (`s3://bucket/p`,
    `aws_default`). Only object-store URLs carry one: in `sftp://user@host/…` the user is fsspec's."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if at and parts.scheme in OBJECT_STORES and user:
        return parts._replace(netloc=host).geturl(), user
    return url, None


def _fsspec_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


# How a connection id becomes a filesystem: set by etl.airflow.storage (Airflow's ObjectStoragePath)
# when the CLI or a DAG task imports it; this module itself never imports Airflow.
_connections: Callable[[str, str, str], tuple[Any, str]] | None = None


def use_connections(opener: Callable[[str, str, str], tuple[Any, str]] | None) -> None:
    """Install how `open_store` turns (url, conn_id, shown) into (filesystem, root)."""
    global _connections
    _connections = opener


def open_store(location: str | Path, *, conn_id: str | None = None) -> Store:
    """The store at `location` (a local path or an fsspec URL). `conn_id` (or one in the URL):
    credentials from that Airflow Connection through ObjectStoragePath (etl.airflow.storage)."""
    text = str(location)
    if not is_url(text) or text.startswith("file://"):
        from fsspec.implementations.local import LocalFileSystem

        local = text.removeprefix("file://")
        return Store(LocalFileSystem(), os.path.abspath(local), local)
    url, in_url = _conn_id_of(text)
    conn_id = in_url or conn_id
    shown = display(text)
    if conn_id:
        if _connections is None:
            raise ConfigError(f"inbox {shown}: a connection id ({conn_id}) needs Airflow installed; "
                              "without Airflow give the URL alone and credentials in the environment")
        fs, root = _connections(url, conn_id, shown)
        return Store(fs, root.rstrip("/"), shown)
    import fsspec.core

    scheme = urlsplit(url).scheme
    try:
        fs, root = fsspec.core.url_to_fs(url, **_fsspec_options(scheme))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"inbox {shown}: fsspec cannot open {scheme}:// ({exc}); "
                          f"for s3:// install labsync[s3]") from None
    return Store(fs, root.rstrip("/"), shown)

