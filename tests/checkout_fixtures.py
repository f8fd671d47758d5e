"""Fixtures for the Rupa Checkout tests: a warehouse with the sandbox's patients and lab tests
extracted and labsync authorized, a webhook receiver on loopback that the sandbox sends its
events to. Imported by the test modules that use them (pytest fixtures by name)."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest

from etl.asgi import BackgroundServer
from etl.extract.streams import extract_all
from etl.settings import WebhookSettings
from etl.webhooks.app import build_app
from tests.rupa_support import authorize


@pytest.fixture
def rupa(engine, settings, sandbox):
    """The Rupa sandbox, with labsync authorized and the patients and lab tests extracted."""
    authorize(engine, settings)
    extract_all(engine, settings)
    return sandbox.sandbox.rupa


@pytest.fixture
def receiver(engine, rupa, settings):
    """The webhook receiver (real HTTP), with the sandbox sending its events to it; its return
    links are signed with the tests' Fernet key (etl.returnlink). Rupa's deliveries are
    authenticated by a capability path (RUPA_WEBHOOK_PATH; `server.rupa_url` is the URL to post
    to) unless the test sets `rupa_secret` (signatures) or passes `authenticated=False` (the
    bare /webhooks/rupa, deliveries stored as hints only)."""
    servers = []

    def start(*, authenticated: bool = True, **changes):
        if authenticated and "rupa_secret" not in changes:
            changes.setdefault("rupa_path_secret", secrets.token_urlsafe(32))
        hooks = replace(WebhookSettings(), **changes)
        server = BackgroundServer(build_app(engine, hooks, fernet_key=settings.fernet_key)).start()
        servers.append(server)
        server.rupa_url = f"{server.url}/webhooks/rupa" + (f"/{hooks.rupa_path_secret}" if hooks.rupa_path_secret else "")
        rupa.checkout.sender.configure(url=server.rupa_url)
        return server

    yield start
    for s in servers:
        s.stop()
