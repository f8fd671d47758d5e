"""One vendor budget for the whole deployment (etl.lgc.budget), on SQLite and PostgreSQL:
several loader processes at once stay under LGC_RATE_LIMIT and LGC_CONCURRENCY as the vendor
(the sandbox) sees them; loaders share the concurrency fairly; a SIGKILLed loader's share comes
back when its lease lapses."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import replace

import pytest
import sqlalchemy as sa

from etl.lgc.budget import BLOCK_SECONDS, AsyncBudget, budget_key, fair_shares, pool_slots
from etl.sandbox.lgc import max_in_window
from etl.settings import LgcSettings
from etl.warehouse.tables import vendor_budget, vendor_budget_leases
from tests.test_lgc_support import LABSYNC, REPO, cli_env, fast, ledger


def _lgc(sandbox):
    return sandbox.sandbox.lgc


def _probe() -> list[str]:
    """A loader process configured like the CLI (tests/lgc_loader_probe.py)."""
    return [LABSYNC[0], "-m", "tests.lgc_loader_probe"]


def test_four_parallel_loader_processes_stay_under_the_rate_and_concurrency_limits(
    engine, settings, sandbox, tmp_path
):
    """Each process alone would send at the full rate with 8 requests in flight; together they
    must share one budget: at most LIMIT requests in flight at the vendor, and in any sliding
    second at most the rate limit plus one reserved block."""
    lgc = _lgc(sandbox)
    lgc.faults.update(latency=0.03)
    rate, concurrency, loaders, rows = 40.0, 3, 4, 30
    # every process runs 3 workers at 40/s; the budget allows that much for all four together
    env = cli_env(fast(settings, concurrency=concurrency, rate_limit=rate))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([*_probe(), f"L{n}", str(rows), str(go)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(loaders)
    ]
    for p in procs:  # all set up before any starts: they load at the same time
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["counts"] == {"accepted": rows}

    seen = lgc.traffic.snapshot()
    assert seen["puts"] == loaders * rows
    assert set(lgc.accepted_count.values()) == {1} and len(lgc.orders) == loaders * rows
    assert seen["max_in_flight"] <= concurrency, seen["max_in_flight"]
    # slots are spaced 1/rate apart in the warehouse; a loader may use one up to a block late
    # (BLOCK_SECONDS) and the sandbox stamps arrivals with a loaded machine's jitter: allow a
    # block for each. Four loaders each at their own limit would show about 4 x 40.
    block = rate * BLOCK_SECONDS
    assert max_in_window(seen["starts"]) <= rate + 2 * block, max_in_window(seen["starts"])
    # the loaders did run at once: their orders interleave at the vendor
    order = [c.split("-")[0] for c in lgc.traffic.order_ids]
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches > loaders
    assert {r["state"] for r in ledger(engine).values()} == {"accepted"}


def test_a_killed_loaders_slots_come_back_when_its_lease_lapses(engine, settings, tmp_path):
    lgc = replace(settings.lgc, concurrency=2).validated()
    env = cli_env(replace(settings, lgc=lgc))
    holder = subprocess.Popen([*_probe(), "hold", "1.5"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.split() == ["holding", "2"], holder.stderr.read() if not line else line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()

    async def go() -> tuple[int, int]:
        budget = AsyncBudget(lgc, engine, holder="after-kill", tick=0.1, lease=1.5)
        await budget.start()
        first = budget.limit  # the dead loader's lease still holds
        try:
            for _ in range(2):
                await asyncio.wait_for(budget.acquire(), timeout=60)
            return first, budget.limit
        finally:
            await budget.close()

    first, later = asyncio.run(go())
    assert first == 0 and later == 2
    with engine.connect() as conn:  # ours was given back at close
        holders = conn.execute(sa.select(vendor_budget_leases.c.holder)).scalars().all()
    assert not any(h.startswith("after-kill") for h in holders)


def test_two_loaders_share_the_concurrency_fairly_and_never_exceed_it(engine, settings):
    lgc = replace(settings.lgc, concurrency=4).validated()

    async def go():
        a = AsyncBudget(lgc, engine, holder="a", tick=0.05)
        b = AsyncBudget(lgc, engine, holder="b", tick=0.05)
        await a.start()
        assert a.limit == 4  # alone: the whole budget
        held = [asyncio.create_task(a.acquire()) for _ in range(4)]
        await asyncio.gather(*held)
        await b.start()
        assert b.limit == 0  # nothing free yet
        waiting = [asyncio.create_task(b.acquire()) for _ in range(4)]
        # `a` keeps wanting 4 (it holds 4) but must shrink to its fair share; it hands slots
        # back as its requests end
        sums = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60  # a bound for a stuck test, not a speed check
        while loop.time() < give_up:
            await asyncio.sleep(0.02)
            if a.in_use > a.limit:
                a.release()
            sums.append(await asyncio.to_thread(_held_sum, engine))
            if a.limit == 2 and b.limit == 2 and sum(t.done() for t in waiting) == 2:
                break
        result = (a.limit, b.limit, sum(t.done() for t in waiting), a.in_use + b.in_use, max(sums))
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await a.close()
        await b.close()
        return result

    a_limit, b_limit, b_running, on_the_wire, most_held = asyncio.run(go())
    assert (a_limit, b_limit, b_running) == (2, 2, 2)
    assert on_the_wire <= 4 and most_held <= 4


def _held_sum(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.sum(vendor_budget_leases.c.held), 0))).scalar()


def test_rate_slots_are_shared_between_loaders_in_one_warehouse(engine, settings):
    """Two budgets (as two processes would have) reserve disjoint slots from the one row."""
    lgc = replace(settings.lgc, rate_limit=50.0).validated()

    async def go() -> list[float]:
        loop = asyncio.get_running_loop()
        budgets = [AsyncBudget(lgc, engine, holder=h) for h in ("x", "y")]
        for b in budgets:
            await b.start()
        times: list[float] = []

        async def one(b: AsyncBudget) -> None:
            await b.acquire()
            times.append(loop.time())
            b.release()

        await asyncio.gather(*(one(b) for b in budgets for _ in range(40)))
        for b in budgets:
            await b.close()
        return times

    times = asyncio.run(go())
    assert len(times) == 80
    # 80 slots at 50/s span at least 79/50 s less a late block; no second holds more than
    # 50 + a block (+ a block of scheduling jitter on a loaded machine)
    block = 50 * BLOCK_SECONDS
    assert max(times) - min(times) >= (80 - 1 - block) / 50
    assert max_in_window(times) <= 50 + 2 * block


def test_a_database_clock_set_back_does_not_stall_the_loaders(engine, settings):
    """A next free slot an hour ahead can only mean the clock went back: start from now."""
    lgc = replace(settings.lgc, rate_limit=50.0).validated()

    async def go() -> None:
        budget = AsyncBudget(lgc, engine, holder="clock")
        await budget.start()
        with engine.begin() as conn:
            conn.execute(sa.update(vendor_budget).values(next_slot=time.time() + 3600))
        try:
            await asyncio.wait_for(budget.acquire(), timeout=30)
        finally:
            await budget.close()

    asyncio.run(go())


def test_fair_shares_water_fill():
    assert fair_shares(8, {"a": 8}) == {"a": 8}
    assert fair_shares(8, {"a": 8, "b": 8}) == {"a": 4, "b": 4}
    assert fair_shares(8, {"a": 1, "b": 8, "c": 8}) == {"a": 1, "b": 4, "c": 3}
    assert fair_shares(3, {"a": 8, "b": 8, "c": 8, "d": 8}) == {"a": 1, "b": 1, "c": 1, "d": 0}
    assert fair_shares(8, {"a": 0, "b": 2}) == {"a": 0, "b": 2}
    assert sum(fair_shares(7, {"a": 5, "b": 5, "c": 5}).values()) == 7


def test_pool_slots_and_budget_key_follow_the_settings():
    assert pool_slots(LgcSettings(concurrency=8)) == 4
    assert pool_slots(LgcSettings(concurrency=1)) == 1
    assert pool_slots(LgcSettings(concurrency=3)) == 1
    a = LgcSettings(base_url="https://api.example/lgc", client_id="AB")
    assert budget_key(a) == "lgc api.example AB"
    assert budget_key(replace(a, client_id="CD")) != budget_key(a)


def test_labsync_budget_prints_the_pool_size_and_the_live_loaders(engine, settings):
    env = cli_env(fast(settings, concurrency=6, rate_limit=30))
    out = subprocess.run([*LABSYNC, "budget", "--pool-slots"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    holder = subprocess.Popen([*_probe(), "hold", "30"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split() == ["holding", "6"]
        shown = subprocess.run([*LABSYNC, "budget", "--json"], env=env, capture_output=True,
                               text=True, timeout=60)
        table = subprocess.run([*LABSYNC, "budget"], env=env, capture_output=True, text=True,
                               timeout=60)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["rate_limit"] == 30 and data["concurrency"] == 6 and data["pool_slots"] == 3
    [loader] = data["loaders"]
    assert loader["holder"].startswith("probe-hold:") and loader["held"] == 6
    assert "airflow pools set lgc_api 3" in table.stdout and "loaders now: 1" in table.stdout


@pytest.mark.parametrize("rate", [0.0, 20.0])
def test_a_local_budget_needs_no_warehouse(rate):
    lgc = LgcSettings(concurrency=2, rate_limit=rate)

    async def go():
        budget = AsyncBudget(lgc)
        await budget.acquire()
        await budget.acquire()
        third = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.05)
        blocked = not third.done()
        budget.release()
        await asyncio.wait_for(third, 5)
        return blocked, budget.peak_in_use

    assert asyncio.run(go()) == (True, 2)
