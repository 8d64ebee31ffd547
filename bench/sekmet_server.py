"""sekmet-fhir, a FHIR R4 server from PyPI (FastAPI, its own SQLite store), served for the benchmark in a process
of its own and with the interpreter of its own virtual environment (`.cache/bench-sekmet`, made by
bench/sekmet.py), so nothing of it enters the connector's. This file therefore imports nothing from the checkout.

    .cache/bench-sekmet/bin/python bench/sekmet_server.py FOLDER [--lifetime S]

It binds 127.0.0.1 on a port the kernel picks, prints one JSON line {"url": "http://127.0.0.1:PORT/fhir"} once it
accepts connections, and serves until SIGTERM, its parent's exit or --lifetime seconds. Its store is
FOLDER/sekmet.db. sekmet's settings are its defaults (inbound validation strict, no auth) except two: its
workflow simulator is off (it would answer the appointments written, as a hospital's scheduler would) and so is
its traffic log of inbound requests (its own switch for load runs: it writes every request and answer into its
database).

Beside sekmet's routes, `GET /fhir/_bench/requests` answers {"requests": N, "cpu": S}: the FHIR requests served
since the last `DELETE` of the same path, and this process's CPU time so far (user + system, all threads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import threading
import time
from typing import Any

import uvicorn
from sekmet.config import Settings, set_settings  # type: ignore[import-not-found]
from sekmet.main import create_app  # type: ignore[import-not-found]

COUNTER = "/fhir/_bench/requests"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Counted:
    """sekmet's app, counting the requests it serves under /fhir, with the counter at COUNTER."""

    def __init__(self, app: Any) -> None:
        self.app, self.requests = app, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != COUNTER:
            if scope["type"] == "http" and scope["path"].startswith("/fhir"):
                self.requests += 1
            await self.app(scope, receive, send)
            return
        body = json.dumps({"requests": self.requests, "cpu": cpu_seconds()}).encode()
        if scope["method"] == "DELETE":
            self.requests = 0
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where sekmet keeps its database")
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = Settings.model_validate(
        {
            "base_url": base_url,
            "host": "127.0.0.1",
            "port": port,
            "data_dir": args.folder,
            "simulator": {"enabled": False},
            "log_inbound": False,
        }
    )
    set_settings(settings)
    app = Counted(create_app(settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    parent = os.getppid()
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("sekmet-fhir did not start")
        time.sleep(0.05)
    print(json.dumps({"url": base_url}), flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline and os.getppid() == parent and not stop.wait(0.2):
        pass
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()
