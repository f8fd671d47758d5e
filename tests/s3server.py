"""A real S3-compatible server on loopback for the inbox tests: moto's standalone server
(`moto[server]`, the same HTTP API as S3), one per test session (per xdist worker).

    server = S3Server().start()        # sets AWS_ENDPOINT_URL and test credentials in os.environ
    url = server.new_inbox()           # s3://labsync-tests/<fresh prefix>/inbox
    server.stop()

The code under test reaches it exactly as it reaches S3: s3fs through etl.intake.storage, with the
standard AWS_* variables (subprocesses inherit them). Nothing of the storage API is mocked.
"""

from __future__ import annotations

import logging
import os
import uuid

BUCKET = "labsync-tests"
ENV = {"AWS_ACCESS_KEY_ID": "labsync-test", "AWS_SECRET_ACCESS_KEY": "labsync-test-secret",
       "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self) -> None:
        self._server = None
        self._saved: dict[str, str | None] = {}
        self.endpoint_url = ""

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        # werkzeug logs a line per request, and on its first line adds a StreamHandler bound to
        # whatever sys.stderr is then (a test's capture, closed later): give it a handler of its own
        quiet = logging.getLogger("werkzeug")
        quiet.setLevel(logging.ERROR)
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        env = {**ENV, "AWS_ENDPOINT_URL": self.endpoint_url}
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=BUCKET)
        return self

    def new_inbox(self) -> str:
        """A fresh, empty inbox URL for one test."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/inbox"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
