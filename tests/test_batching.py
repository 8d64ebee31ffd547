"""Group commit: concurrent callers share one call, each gets its own results or the shared error."""

from __future__ import annotations

import asyncio

import pytest

from connector.ledger.batching import Coalesced


async def test_calls_made_while_one_runs_go_together_in_order() -> None:
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def double(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            await asyncio.wait_for(gate.wait(), 5)  # the first call is slow: the others queue up meanwhile
        return [2 * i for i in items]

    coalesced = Coalesced(double)
    first = asyncio.create_task(coalesced([1]))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(coalesced([10 * k, 10 * k + 1])) for k in range(1, 4)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await first == [2]
    assert [await t for t in rest] == [[20, 22], [40, 42], [60, 62]]
    assert calls == [[1], [10, 11, 20, 21, 30, 31]]
    assert await coalesced([]) == []
    assert await coalesced([5]) == [10]  # a lone call goes at once


async def test_an_error_reaches_every_caller_of_that_call_only() -> None:
    async def fail_on_zero(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("zero")
        return items

    coalesced = Coalesced(fail_on_zero)
    results = await asyncio.gather(coalesced([0]), coalesced([1]), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]  # one call held both
    assert await coalesced([3]) == [3]


async def test_a_call_that_returns_the_wrong_number_of_results_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    coalesced: Coalesced[int, int] = Coalesced(short)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        await coalesced([1, 2])


async def test_cancelling_the_worker_cancels_every_waiting_call() -> None:
    gate = asyncio.Event()

    async def slow(items: list[int]) -> list[int]:
        await asyncio.wait_for(gate.wait(), 5)
        return items

    coalesced = Coalesced(slow)
    first = asyncio.create_task(coalesced([1]))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(coalesced([2]))  # queued behind the running call
    await asyncio.sleep(0.05)
    assert coalesced._worker is not None
    coalesced._worker.cancel()
    results = await asyncio.gather(first, second, return_exceptions=True)
    gate.set()
    assert [type(r) for r in results] == [asyncio.CancelledError, asyncio.CancelledError]
