"""Issue 10, point 4: the Rupa client remembers every page of a run and stops on any repeat (not
only a link to the same page), and a run has a page budget. Either ends with a clear RupaApiError
(exit 1) and leaves `sync_state` so that the next run starts over or resumes correctly."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from etl.cli import main
from etl.extract.streams import extract_stream
from etl.rupa.client import RupaApiError
from etl.warehouse import rupa_patients
from tests.rupa_support import authorize, cli_env, count, state_of, with_rupa

SAFETY = 300  # the sandbox stops any loop after this many pages, so a client that never
# notices ends its run (and the test fails) instead of hanging


def _after(url: str) -> int:
    return int(dict(parse_qsl(urlsplit(url).query)).get("page[after]", -1))


def _url(url: str, query: str, *, path: str | None = None, fragment: str = "") -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, path or p.path, query, fragment))


def _first_again(url: str, size: int) -> str:
    """The first page (`?page%5Bsize%5D=7`) spelled differently: raw brackets and a fragment."""
    return _url(url, f"page[size]={size}", fragment="again")


def _on_page(n: int, make):
    """A rewrite that links page n (1-based) to `make(url, size)`, the others as the server says."""
    return lambda url, nxt, size: make(url, size) if _after(url) >= size * (n - 1) - 1 else nxt


CASES = {
    "self link": lambda url, nxt, size: url,
    "two-page cycle": _on_page(2, _first_again),
    "three-page cycle": _on_page(3, _first_again),
    "back to page two, params reordered": _on_page(3, lambda url, size: _url(
        url, urlencode([("page[after]", str(size - 1)), ("page[size]", str(size))]))),
    "percent-encoded path": _on_page(2, lambda url, size: _url(
        url, f"page%5Bsize%5D={size}", path=urlsplit(url).path.replace("/patients", "/%70atients"))),
}


def _install(rupa, rewrite, size: int) -> list[str]:
    served: list[str] = []

    def hook(url: str, nxt: str | None) -> str | None:
        served.append(url)
        if len(served) >= SAFETY:
            return None
        return rewrite(url, nxt, size)

    rupa.rewrite_next = hook
    return served


@pytest.fixture
def rupa(sandbox):
    return sandbox.sandbox.rupa


@pytest.mark.parametrize("case", list(CASES))
def test_a_repeated_page_ends_the_run_with_a_clear_error_and_the_next_run_starts_over(engine, settings, rupa, case):
    size = 7
    settings = with_rupa(settings, page_size=size)
    authorize(engine, settings)
    served = _install(rupa, CASES[case], size)
    with pytest.raises(RupaApiError) as info:
        extract_stream(engine, settings, "patients")
    assert "repeat" in str(info.value) and info.value.exit_code in (1, 2)
    assert len(served) <= 5  # stopped at the first repeat, not after the sandbox's safety stop
    state = state_of(engine, "patients")
    assert state["status"] == "failed" and "repeat" in state["error"]
    assert state["resume_url"] is None  # links of a looping server are not trusted: start over
    stored = count(engine, rupa_patients)
    assert stored == state["inserted"] <= 5 * size

    rupa.rewrite_next = None  # the vendor fixed its paging
    summary = extract_stream(engine, settings, "patients")
    assert not summary.resumed and summary.deleted == 0
    assert count(engine, rupa_patients, live=True) == 50
    assert state_of(engine, "patients")["status"] == "succeeded"


def test_a_cycle_of_links_next_ends_labsync_extract_with_exit_1(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings, page_size=7)
    authorize(engine, settings)
    _install(rupa, CASES["two-page cycle"], 7)
    assert main(["extract", "patients", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("labsync: ") and "\n" not in err and "repeat" in err


def test_endless_distinct_pages_stop_at_the_page_budget_and_the_next_run_resumes(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings, page_size=7)
    authorize(engine, settings)
    monkeypatch.setenv("RUPA_MAX_PAGES", "3")
    assert main(["extract", "patients", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "RUPA_MAX_PAGES" in err and "3 pages" in err
    state = state_of(engine, "patients")
    assert state["status"] == "failed" and state["inserted"] == 21 and state["resume_url"]

    monkeypatch.setenv("RUPA_MAX_PAGES", "100")  # a real clinic this big: the next run goes on
    assert main(["extract", "patients", "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert count(engine, rupa_patients, live=True) == 50
    assert state_of(engine, "patients")["deleted"] == 0


def test_a_server_minting_new_cursors_forever_is_stopped_by_the_budget(engine, settings, rupa, monkeypatch, capsys):
    cli_env(monkeypatch, settings, page_size=7)
    authorize(engine, settings)
    monkeypatch.setenv("RUPA_MAX_PAGES", "20")
    n = iter(range(10**6))
    _install(rupa, lambda url, nxt, size: _url(url, f"page[size]=7&n={next(n)}"), 7)
    assert main(["extract", "patients", "--no-progress"]) == 1
    assert "RUPA_MAX_PAGES" in capsys.readouterr().err
    assert len(rupa.requests) <= 21
