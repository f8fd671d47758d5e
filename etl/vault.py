"""Secrets and PHI at rest: the OAuth tokens labsync keeps in the warehouse (`oauth_tokens`) and
the order bodies waiting to be sent (`lgc_outbox.body`) are encrypted with Fernet (the
`cryptography` package: AES-128-CBC + HMAC-SHA256, timestamped).

Where the key comes from, first match wins:
1. `LABSYNC_FERNET_KEY` (`Settings.fernet_key`): one key, or `new,old,...` while rotating. The
   first encrypts; any of them decrypts (MultiFernet). Give the same value to the CLI and to
   every Airflow worker (e.g. from a Kubernetes Secret).
2. In Airflow tasks, the Variable `labsync_fernet_secret` (etl.airflow.settings.task_settings), which a
   secrets backend can hold. Airflow's own `[core] fernet_key` is deliberately not used: Airflow
   3 workers need not have it, and the CLI must read the rows the DAGs write.
3. For an embedded SQLite warehouse only: a key file beside the database (`labsync.db.key`,
   mode 0600), created on first use, so `make demo` and a laptop need no setup. A server
   warehouse (PostgreSQL) never gets a made-up key: without 1 or 2 it is a ConfigError, raised
   before any token is requested (an authorization code is single-use).

Stored values are `fernet:<token>`. A value without the prefix is a plain token stored by an
older labsync: it is read once and written back encrypted (etl.rupa.auth.TokenStore), and
`labsync db rotate-key` encrypts such rows too.

This module only seals and opens: it writes no table. Rotation is done by each table's one writer
(etl.rupa.auth.reseal_tokens, etl.orders.outbox.reseal_bodies), in one transaction that
`labsync db rotate-key` (etl.commands.core) holds.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import overload

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Engine

from etl.errors import ConfigError

PREFIX = "fernet:"
KEY_FILE_SUFFIX = ".key"

HOW_TO_GET_A_KEY = "generate one with `labsync db new-key`"


class Vault:
    """Encrypts and decrypts stored secrets with one or more Fernet keys (the first encrypts)."""

    def __init__(self, keys: list[bytes], source: str) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.source = source  # where the keys came from, for messages (never the keys)

    @staticmethod
    def is_sealed(stored: str | None) -> bool:
        return stored is not None and stored.startswith(PREFIX)

    @overload
    def seal(self, secret: str) -> str: ...
    @overload
    def seal(self, secret: None) -> None: ...
    @overload
    def seal(self, secret: str | None) -> str | None: ...

    def seal(self, secret: str | None) -> str | None:
        if secret is None:
            return None
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    @overload
    def open(self, stored: str) -> str: ...
    @overload
    def open(self, stored: None) -> None: ...
    @overload
    def open(self, stored: str | None) -> str | None: ...

    def open(self, stored: str | None) -> str | None:
        """The secret; a plain (older) value as it is. ConfigError when no key fits."""
        if stored is None or not self.is_sealed(stored):
            return stored
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise ConfigError(
                f"the tokens stored in the warehouse cannot be decrypted with {self.source}: set "
                "LABSYNC_FERNET_KEY to the key they were stored with (new,old while rotating), "
                "or run `labsync rupa authorize` again") from None

    def reseal(self, stored: str | None) -> str | None:
        """Encrypted with the first key (a plain value is encrypted)."""
        if stored is None:
            return None
        if not self.is_sealed(stored):
            return self.seal(stored)
        try:
            return PREFIX + self._fernet.rotate(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            self.open(stored)  # raises the plain ConfigError
            raise


def new_key() -> str:
    return Fernet.generate_key().decode()


def parse_keys(text: str, source: str = "LABSYNC_FERNET_KEY") -> list[bytes]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"{source} is empty; {HOW_TO_GET_A_KEY}")
    for k in keys:
        try:
            Fernet(k.encode())
        except (ValueError, TypeError):
            raise ConfigError(f"{source} holds something that is not a Fernet key (32 url-safe "
                              f"base64-encoded bytes); {HOW_TO_GET_A_KEY}") from None
    return [k.encode() for k in keys]


def key_file_for(engine: Engine) -> Path | None:
    """The key file of an embedded SQLite warehouse (None for any other warehouse)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    path = Path(db)
    return path.with_name(path.name + KEY_FILE_SUFFIX)


def _read_or_create(path: Path) -> bytes:
    """The key in `path`, created (0600, atomically: two first runs agree on one key) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name no other process picks (O_EXCL below), whatever PID namespace it runs in
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_key() + "\n")
            try:
                os.link(tmp, path)  # fails if another process made it first: use theirs
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def vault_for(fernet_key: str | None, engine: Engine) -> Vault:
    """The vault for this warehouse: LABSYNC_FERNET_KEY (or the Airflow Variable, already in
    `fernet_key`), else the embedded SQLite key file, else a ConfigError."""
    if fernet_key:
        return Vault(parse_keys(fernet_key), "LABSYNC_FERNET_KEY")
    path = key_file_for(engine)
    if path is None:
        raise ConfigError("labsync stores the Rupa tokens and the orders waiting to be sent "
                          "encrypted and has no key for this "
                          "warehouse: set LABSYNC_FERNET_KEY (or the Airflow Variable "
                          f"labsync_fernet_secret); {HOW_TO_GET_A_KEY}")
    return Vault(parse_keys(_read_or_create(path).decode(), f"the key file {path.name}"),
                 f"the key file {path} (LABSYNC_FERNET_KEY is not set)")
