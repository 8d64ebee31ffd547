"""Group commit: ledger calls from concurrent tasks gathered into one transaction.

While one call runs (on the ledger's worker thread, connector.ledger.aio), the calls that arrive meanwhile
wait and then run together as the next one. No timer is involved, so a lone call goes at once; under load
a transaction serves every send that finished (or is about to start) in the meantime, instead of one
transaction each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalesced(Generic[T, R]):
    """`await coalesced(items)` returns `call(items)`'s results for those items; `call` (an async ledger
    call) may receive other tasks' items with them and must return one result per item, in order.
    When `call` raises, every task whose items it held gets the exception."""

    def __init__(self, call: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._call = call
        self._waiting: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        group: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                items = [item for part, _ in group for item in part]
                try:
                    results = list(await self._call(items))
                    if len(results) != len(items):
                        raise RuntimeError(f"{self._call!r} returned {len(results)} results for {len(items)} items")
                except Exception as exc:  # noqa: BLE001 - handed to every waiting task
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                offset = 0
                for part, future in group:
                    if not future.done():
                        future.set_result(results[offset : offset + len(part)])
                    offset += len(part)
        except BaseException:  # cancelled (the loop is closing): nobody may wait for ever
            for _, future in [*group, *self._waiting]:
                future.cancel()
            self._waiting = []
            raise
