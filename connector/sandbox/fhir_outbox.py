"""Notification deliveries of the FHIR test server, sent from the server's event loop.

Deliveries are queued from any thread (`FhirState.put` may run on a test's thread) and sent by the loop the
server last ran a request on (adopted on each request). One key's deliveries (a subscription's) go in
order; each is sent once with a short timeout and its outcome handed to its `done` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httpx

TIMEOUT = 2.0


@dataclass(frozen=True)
class Outgoing:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Delivery:
    """A notification to send: `prepare` runs at send time (None = skip), `done` gets the error or None."""

    key: str
    prepare: Callable[[], Outgoing | None]
    done: Callable[[Outgoing, str | None], None]


class Outbox:
    """Sends deliveries from the server's event loop: queued from any thread, one key's in order."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []  # bugs in a delivery task, raised by flush()
        self._queue: deque[Delivery] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tails: dict[str, asyncio.Task[None]] = {}

    def attach(self) -> None:
        """Adopt the running loop (called on every request) and start what is queued."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._tails = loop, {}
        self._start()

    def send(self, delivery: Delivery) -> None:
        """Queue a delivery (from any thread); a loop already adopted starts it at once."""
        self._queue.append(delivery)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the next request's loop sends it
                loop.call_soon_threadsafe(self._start)

    def clear(self) -> None:
        self._queue.clear()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued (and what that queues) is sent; False on timeout."""
        self.attach()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.tasks or self._queue:
            self._start()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=remaining)
        if self.errors:
            errors, self.errors = self.errors, []
            raise RuntimeError(f"{len(errors)} notification task(s) failed") from errors[0]
        return True

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            delivery = self._queue.popleft()
            task = loop.create_task(self._deliver(delivery, self._tails.get(delivery.key)))
            self._tails[delivery.key] = task
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, delivery.key))

    def _finished(self, key: str, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]
        if not task.cancelled() and (error := task.exception()) is not None:
            self.errors.append(error)

    async def _deliver(self, delivery: Delivery, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        outgoing = delivery.prepare()
        if outgoing is None:
            return
        error: str | None = None
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.request(
                    outgoing.method, outgoing.url, headers=outgoing.headers, content=outgoing.body
                )
            if not response.is_success:
                error = f"HTTP {response.status_code}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = type(exc).__name__
        delivery.done(outgoing, error)
