"""The package's own FHIR test server and Paubox sandbox (or any ASGI app), served by uvicorn on 127.0.0.1
in a background thread of the calling process, for as long as a `with` block lasts."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.testing.errors import HarnessError

API_KEY = "test-sandbox-key"  # the sandbox's made-up Paubox key; no real key is involved
USERNAME = "clinic"  # the Paubox API username the written configs use (/v1/clinic)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """An ASGI app served by uvicorn on 127.0.0.1 in a daemon thread: `with Server(app) as server:` waits until
    it accepts connections (`server.url`), and the end of the block stops it. `options` go to uvicorn's
    Config (`ssl_keyfile` and `ssl_certfile` serve https)."""

    def __init__(self, app: Any, port: int | None = None, *, start_timeout: float = 10, **options: Any) -> None:
        self.port = port or free_port()
        scheme = "https" if options.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._start_timeout = start_timeout
        settings: dict[str, Any] = {"log_level": "error", "access_log": False, "lifespan": "off", **options}
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **settings))
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise HarnessError(f"the test server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def sandbox_state(**fields: Any) -> SandboxState:
    """A Paubox sandbox that accepts `API_KEY` under `USERNAME`; `fields` set the rest (latency, faults, …)."""
    return SandboxState(**{"api_key": API_KEY, "username": USERNAME, **fields})


def serve_fhir(state: FhirState | None = None, port: int | None = None) -> Server:
    """The FHIR test server over `state` (an empty one by default), to use in a `with` block."""
    return Server(fhir_app(state if state is not None else FhirState()), port)


def serve_paubox(state: SandboxState | None = None, port: int | None = None) -> Server:
    """The Paubox sandbox over `state` (`sandbox_state()` by default), to use in a `with` block."""
    return Server(paubox_app(state if state is not None else sandbox_state()), port)
