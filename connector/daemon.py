"""`connector run`: the only module that knows APScheduler. Schedules, signals, graceful stop.

Each source's poll runs on its own interval and the dispatcher on `dispatch.interval`; a job never runs
twice at once (max_instances=1) and missed runs are coalesced. SIGTERM/SIGINT stop the schedule, let
in-flight sends finish (their outcome is recorded), give back leases and exit. SIGHUP reads the mappings
and their templates again: all of them are loaded and checked first, and only a folder without a problem
replaces the mappings in use (a broken one is logged, by file and line, and the old mappings stay).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from connector import metrics
from connector.errors import ConfigError
from connector.logs import where
from connector.results import CycleReport, DispatchReport, PollReport
from connector.sending.aftercare import ReceiptReader

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from connector.runtime import Runtime
    from connector.web.httpserver import EmbeddedServer

log = structlog.get_logger("connector.daemon")

STOP_GRACE_SECONDS = 15.0  # on top of the longest a send may take (connect + read timeouts)


async def poll(runtime: Runtime, name: str) -> PollReport:
    """One poll of a source, timed and reported to the health monitor (unless another replica polls it)."""
    started = time.monotonic()
    try:
        report = await runtime.poller.poll(name)
    except Exception as exc:  # noqa: BLE001 - a bug in one source's poll must not stop the others
        log.error("poll.crashed", source=name, problem=where(exc))
        report = PollReport(name, error=f"unexpected {where(exc)}")
    if not report.skipped:
        await runtime.monitor.polled(name, report.error, time.monotonic() - started)
    return report


async def dispatch(runtime: Runtime) -> DispatchReport:
    report = await runtime.dispatcher.run()
    await runtime.monitor.dispatched()
    return report


async def run_once(runtime: Runtime) -> CycleReport:
    """One poll of every source, one dispatch of everything due, then the after-send checks."""
    report = CycleReport(polls=list(await asyncio.gather(*(poll(runtime, name) for name in runtime.sources))))
    if runtime.crm is not None:
        await runtime.crm.process()
    report.dispatch = await dispatch(runtime)
    await aftercare(runtime)
    await write_back(runtime)
    return report


async def write_back(runtime: Runtime) -> None:
    """The writes owed to the EHR (Communications for what was sent), after the emails."""
    await runtime.write_back.run()


async def aftercare(runtime: Runtime) -> None:
    """Refusal counts to the ledger, the in-doubt policy, retention (CRM events, the journal, where emails with
    expired links went), then receipts for sent notifications no webhook reported on."""
    await runtime.store.reports.add_rejections(metrics.take_refused(), runtime.aftercare.clock())
    await runtime.aftercare.settle_doubts()
    if runtime.crm is not None:
        await runtime.crm.purge()
    await runtime.store.journal.purge(runtime.aftercare.clock() - runtime.config.ledger.journal_retention)
    if runtime.actions is not None:
        await runtime.actions.forget(runtime.aftercare.clock())
    if isinstance(runtime.mailer, ReceiptReader):
        await runtime.aftercare.check_receipts(runtime.mailer)


def web_app(runtime: Runtime) -> Starlette:
    """Every endpoint `connector run` serves (tests drive this same app in-process)."""
    # The web side (Starlette, uvicorn) is imported when a server is configured, not by `run --once`.
    from connector.web import health
    from connector.web.app import console_routes, create_app
    from connector.web.console.preview import Previewer
    from connector.web.console.replay import Replayer
    from connector.web.fhir import FhirEndpoints
    from connector.web.links import LinkEndpoints

    return create_app(
        runtime.config,
        runtime.aftercare,
        extra_routes=[
            *health.routes(runtime.monitor),
            *FhirEndpoints(runtime.config, runtime.subscriptions).routes(),
            *(runtime.crm_receiver.routes() if runtime.crm_receiver else []),
            *console_routes(
                runtime.config,
                runtime.ledger,
                Previewer(runtime.mappings, runtime.dispatcher.preparers, runtime.aftercare.clock),
                Replayer(runtime.planner, runtime.poller, runtime.store.reports),
            ),
            *(
                LinkEndpoints(runtime.config, runtime.actions, runtime.aftercare.clock).routes()
                if runtime.actions is not None
                else []
            ),
        ],
    )


def web_server(runtime: Runtime) -> EmbeddedServer | None:
    settings = runtime.config.server
    if settings is None:
        return None
    from connector.web import httpserver

    return httpserver.EmbeddedServer(httpserver.server_config(web_app(runtime), settings))


async def reload_mappings(runtime: Runtime) -> bool:
    """SIGHUP: the mappings folder loaded again and, when every file is well, put in use. False (and the
    old mappings kept) when any file has a problem; the log names files, lines and what is wrong, which
    are parts of the mappings, never patient data."""
    try:
        fresh = await asyncio.to_thread(runtime.load_mappings)
    except ConfigError as exc:
        log.error(
            "mappings.reload_failed",
            problems=[str(p) for p in exc.problems[:10]],
            count=len(exc.problems),
            kept=runtime.mappings.names(),
        )
        return False
    except Exception as exc:  # noqa: BLE001 - a failed reload must not stop the daemon
        log.error("mappings.reload_failed", problem=where(exc), kept=runtime.mappings.names())
        return False
    runtime.mappings.replace(fresh)
    log.info("mappings.reloaded", mappings=runtime.mappings.names())
    return True


async def run_forever(runtime: Runtime) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the mappings."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler  # not imported by `run --once` (cron)

    from connector.web.httpserver import listen

    stop = asyncio.Event()
    running: set[asyncio.Task[object]] = set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:
        if stop.is_set():  # stopping: nothing new starts (and SIGHUP still does not kill the process)
            return
        task = asyncio.create_task(reload_mappings(runtime))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    def guarded(name: str, job: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        async def wrapper() -> None:
            if stop.is_set():
                return
            task = asyncio.current_task()
            assert task is not None
            running.add(task)
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - one failing job must not stop the daemon
                log.error("job.crashed", job=name, problem=where(exc))
            finally:
                running.discard(task)

        return wrapper

    scheduler = AsyncIOScheduler(timezone=UTC)
    now = datetime.now(UTC)
    for name, source in runtime.sources.items():
        scheduler.add_job(
            guarded(f"poll:{name}", lambda n=name: poll(runtime, n)),  # type: ignore[misc]
            "interval",
            seconds=source.config.interval.total_seconds(),
            id=f"poll:{name}",
            max_instances=1,
            coalesce=True,
            next_run_time=now,
        )
    if runtime.crm is not None:
        scheduler.add_job(
            guarded("crm", runtime.crm.process),
            "interval",
            seconds=runtime.config.dispatch.interval.total_seconds(),
            id="crm",
            max_instances=1,
            coalesce=True,
            next_run_time=now,
        )
    # Notifications committed by a poll or a Subscription notification wake the dispatcher, so that what is
    # due now does not wait for `dispatch.interval`. One dispatch at a time (the lock), whether the schedule
    # or a wake started it; what is planned while one runs makes it run once more.
    dispatching = asyncio.Lock()
    wanted = {"again": False}

    async def dispatch_job() -> None:
        if dispatching.locked():
            wanted["again"] = True
            return
        async with dispatching:
            while True:
                wanted["again"] = False
                await dispatch(runtime)
                if not wanted["again"] or stop.is_set():
                    return

    woken = guarded("dispatch", dispatch_job)

    def wake_dispatch() -> None:
        if dispatching.locked():
            wanted["again"] = True
        elif not stop.is_set():
            task: asyncio.Future[None] = asyncio.ensure_future(woken())
            wakes.add(task)
            task.add_done_callback(wakes.discard)

    wakes: set[asyncio.Future[None]] = set()  # held until done (the guarded job registers itself for the stop)
    runtime.planner.on_planned = wake_dispatch
    intake, affinity = runtime.ledger.intake, runtime.config.dispatch.affinity
    if intake.dialect == "postgresql" and affinity:  # replicas: who polled has the resources in its cache
        intake.affinity = (runtime.dispatcher.owner, affinity)
    scheduler.add_job(
        woken,
        "interval",
        seconds=runtime.config.dispatch.interval.total_seconds(),
        id="dispatch",
        max_instances=1,
        coalesce=True,
        next_run_time=now,
    )
    # Always scheduled (it returns at once when nothing is owed): a mapping reload may turn a hand-off on.
    scheduler.add_job(
        guarded("write_back", lambda: write_back(runtime)),
        "interval",
        seconds=runtime.config.dispatch.interval.total_seconds(),
        id="write_back",
        max_instances=1,
        coalesce=True,
        next_run_time=now,
    )
    scheduler.add_job(
        guarded("aftercare", lambda: aftercare(runtime)),
        "interval",
        seconds=60,
        id="aftercare",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        guarded("subscriptions", runtime.subscriptions.watchdog),
        "interval",
        seconds=60,
        id="subscriptions",
        max_instances=1,
        coalesce=True,
    )
    server = web_server(runtime)
    sockets = [listen(runtime.config.server)] if server and runtime.config.server else []
    server_task = asyncio.create_task(server.serve(sockets=sockets)) if server else None
    scheduler.start()
    log.info(
        "daemon.started",
        sources=list(runtime.sources),
        mappings=runtime.mappings.names(),
        listening=f"{server.config.host}:{server.config.port}" if server else None,
    )
    await stop.wait()

    log.info("daemon.stopping", in_flight=len(running))
    runtime.dispatcher.stopping = True
    runtime.write_back.stopping = True
    scheduler.pause()  # no new runs; shutting the scheduler down now would cancel the running jobs
    paubox = runtime.config.delivery.paubox
    grace = STOP_GRACE_SECONDS + (paubox.connect_timeout + paubox.read_timeout).total_seconds()
    if running:
        _, late = await asyncio.wait(running, timeout=grace)
        for task in late:
            task.cancel()
    scheduler.shutdown(wait=False)
    if server is not None and server_task is not None:
        server.should_exit = True
        await server_task
    await runtime.store.reports.add_rejections(metrics.take_refused(), runtime.aftercare.clock())
    log.info("daemon.stopped")
