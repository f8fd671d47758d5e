"""The trust boundary (issue 21), the parts that hold today: credentials, tokens and PHI never
travel in clear to a vendor (a plain-http vendor URL that is not loopback is a configuration
error before any request), and the webhook receiver fails closed (it does not listen beyond
loopback while a vendor's deliveries would be accepted unauthenticated)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from etl.settings import is_loopback_host
from tests.conftest import migrated
from tests.netpeers import ForwardProxy
from tests.test_http_stack import _orders_csv

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LGC_", "RUPA_", "LABSYNC_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                                   "all_proxy", "no_proxy")}
    env.update(LABSYNC_WAREHOUSE_URL=migrated(f"sqlite:///{tmp_path / 'wh.db'}"), **extra)
    return env


def _labsync(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ---- https only -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "args"), [
    ("LGC_BASE_URL", ("load", "{csv}")),
    ("LGC_BASE_URL", ("track", "ORDER-1")),
    ("RUPA_BASE_URL", ("extract", "--no-progress")),
])
def test_a_plain_http_vendor_url_off_loopback_exits_2_before_any_request(tmp_path, setting, args):
    """Every request would go through the proxy the environment names: it sees none."""
    path, _ = _orders_csv(tmp_path, 2)
    with ForwardProxy() as proxy:  # refuses anything but loopback itself, were a request to come
        env = _env(tmp_path, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, RUPA_API_TOKEN="ready.token",
                   LGC_CLIENT_ID="ABCD", LGC_ACCESS_KEY="a" * 25, LGC_SECRET_KEY="b" * 25,
                   **{setting: "http://vendor.example.invalid/api"})
        done = _labsync(env, *(a.format(csv=path) for a in args))
        assert done.returncode == 2, done.stderr
        assert setting in done.stderr and "https" in done.stderr and "Traceback" not in done.stderr
        assert proxy.seen == [] and proxy.connections == 0


def test_plain_http_stays_allowed_for_the_local_sandbox(sandbox, lite_settings, tmp_path):
    from etl.settings import check_base_url

    check_base_url("LGC_BASE_URL", lite_settings.lgc.base_url)  # http://127.0.0.1:…: no error
    check_base_url("LGC_BASE_URL", "http://localhost:8765/lgc")
    check_base_url("LGC_BASE_URL", "https://api.example.com/v1")


# ---- the receiver fails closed ----------------------------------------------------------------

def _serve(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "etl.cli", "webhooks", "serve", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _healthy(port: int, proc: subprocess.Popen, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.1)
    return False


@pytest.mark.parametrize(("keys", "missing"), [
    ({}, ("LGC_WEBHOOK_KEY", "RUPA_WEBHOOK_SECRET or RUPA_WEBHOOK_PATH")),
    ({"LGC_WEBHOOK_KEY": "c2VjcmV0LWtleS1mb3ItbGdj"}, ("RUPA_WEBHOOK_SECRET",)),
    ({"RUPA_WEBHOOK_SECRET": "rupa-secret"}, ("LGC_WEBHOOK_KEY",)),
], ids=["no-keys", "no-rupa-secret", "no-lgc-key"])
def test_serve_beyond_loopback_without_keys_exits_2_naming_them(tmp_path, keys, missing):
    port = _free_port()
    done = _labsync(_env(tmp_path, **keys), "webhooks", "serve", "--host", "0.0.0.0", "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert all(name in done.stderr for name in missing) and "--allow-unauthenticated" in done.stderr
    with pytest.raises(httpx.ConnectError):  # it never listened
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_serve_beyond_loopback_starts_with_every_key_or_when_told_and_warns(tmp_path):
    keyed = _env(tmp_path, LGC_WEBHOOK_KEY="c2VjcmV0LWtleS1mb3ItbGdj", RUPA_WEBHOOK_SECRET="rupa-secret")
    path = "Jx3-" + "k" * 40  # Rupa authenticated by a capability path instead of a signature
    by_path = _env(tmp_path, LGC_WEBHOOK_KEY="c2VjcmV0LWtleS1mb3ItbGdj", RUPA_WEBHOOK_PATH=path)
    for env, args, warned in ((keyed, (), False), (by_path, (), False),
                              (_env(tmp_path), ("--allow-unauthenticated",), True)):
        port = _free_port()
        proc = _serve(env, "--host", "0.0.0.0", "--port", str(port), *args)
        try:
            assert _healthy(port, proc), proc.stderr.read() if proc.poll() is not None else "no answer"
            if env is by_path:  # only the capability URL takes Rupa's deliveries
                assert httpx.post(f"http://127.0.0.1:{port}/webhooks/rupa", json={"type": "x"}).status_code == 404
                assert httpx.post(f"http://127.0.0.1:{port}/webhooks/rupa/{path}", json={"type": "x"}).status_code == 200
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
        assert ("unauthenticated deliveries accepted" in err) is warned, err
        assert path not in out + err  # the secret is never printed


def test_serve_on_loopback_needs_no_keys(tmp_path):
    port = _free_port()
    proc = _serve(_env(tmp_path), "--host", "127.0.0.1", "--port", str(port))
    try:
        assert _healthy(port, proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_what_counts_as_loopback():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.0.0.1", "receiver.example", "192.168.1.2",
                                                 "127.example.com", "127.0.0.1.nip.io"))


def test_a_name_that_starts_with_127_is_not_loopback_and_needs_https():
    """`http://127.example.com` once passed as the sandbox (a prefix check): it is a name like any."""
    from etl.errors import ConfigError
    from etl.settings import check_base_url

    with pytest.raises(ConfigError, match="LGC_BASE_URL must be an https URL"):
        check_base_url("LGC_BASE_URL", "http://127.example.com/lgc")


def test_a_rupa_connection_carries_the_result_origins():
    from types import SimpleNamespace

    from etl.airflow.hooks import rupa_from_connection
    from etl.errors import ConfigError
    from etl.settings import RupaSettings

    def conn(extra):
        return SimpleNamespace(host="https://api.rupa.example", login=None, password=None, schema=None, port=None,
                               extra=extra, extra_dejson=extra)

    base = RupaSettings()
    as_text = rupa_from_connection(conn({"result_origins": "https://files.rupa.example/, https://cdn.rupa.example"}), base)
    assert as_text.result_origins == ("https://files.rupa.example", "https://cdn.rupa.example")
    as_list = rupa_from_connection(conn({"result_origins": ["https://files.rupa.example"]}), base)
    assert as_list.result_origins == ("https://files.rupa.example",)
    with pytest.raises(ConfigError, match="RUPA_RESULT_ORIGINS"):
        rupa_from_connection(conn({"result_origins": "http://files.rupa.example"}), base)
