"""The test harness that ships with the package: what the tests, the chaos run and the benchmark build their
world from. Nothing in the product imports it.

    servers     the FHIR test server and the Paubox sandbox (any ASGI app) served by uvicorn on 127.0.0.1
                in a thread, for a `with` block; free ports
    configs     config files for those servers: `write_config`, copies of the shipped mappings
    databases   PostgreSQL private schemas (URL with `search_path`), SQLite URLs, the ledger's engine, migrated or not
    processes   `connector run` daemons and other children: start, wait for /livez, SIGTERM, SIGKILL,
                restart, their logs; the CLI run to its end
    resources   fictional Patients and Appointments

For example, one daemon against both sandboxes:

    with serve_fhir(fhir_state) as fhir, serve_paubox() as paubox:
        port = free_port()
        config = write_config(folder, fhir.url, paubox.url, server={"port": port})
        with daemon(config) as child:
            child.wait_http(f"http://127.0.0.1:{port}/livez")

Everything listens on 127.0.0.1 only; made-up keys (`API_KEY`) and example.org addresses only. Failures to
set up are `HarnessError`, with the end of the child's log.
"""

from __future__ import annotations

from connector.testing.configs import OPTOUT_KEY, SENDER, SHIPPED_MAPPINGS, copy_mappings, write_config
from connector.testing.databases import (
    PG_URL,
    create_schema,
    drop_schema,
    ledger_engine,
    migrated_engine,
    pg_schema,
    schema_url,
    sqlite_url,
)
from connector.testing.errors import HarnessError
from connector.testing.processes import Process, cli, connector_argv, daemon, environment
from connector.testing.resources import appointment, bundle, instant, patient
from connector.testing.servers import (
    API_KEY,
    USERNAME,
    Server,
    free_port,
    sandbox_state,
    serve_fhir,
    serve_paubox,
)

__all__ = [
    "API_KEY",
    "OPTOUT_KEY",
    "PG_URL",
    "SENDER",
    "SHIPPED_MAPPINGS",
    "USERNAME",
    "HarnessError",
    "Process",
    "Server",
    "appointment",
    "bundle",
    "cli",
    "connector_argv",
    "copy_mappings",
    "create_schema",
    "daemon",
    "drop_schema",
    "environment",
    "free_port",
    "instant",
    "ledger_engine",
    "migrated_engine",
    "patient",
    "pg_schema",
    "sandbox_state",
    "schema_url",
    "serve_fhir",
    "serve_paubox",
    "sqlite_url",
    "write_config",
]
