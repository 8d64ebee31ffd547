"""The world of a chaos run: generated resources for the FHIR test server, the daemons' config, and reads of
the ledger's `notification` table (the chaos run never writes to it)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from chaos.verdict import MAPPING, Row
from connector.testing import appointment, bundle, ledger_engine, patient, write_config


def appointment_id(index: int) -> str:
    return f"chaos-{index:06d}"


def write_resources(folder: Path, count: int, rng: random.Random, now: datetime) -> list[str]:
    """N Patients (example.org addresses, made-up names) and N booked Appointments 2-6 days ahead, as two
    Bundles. Returns the appointment ids."""
    folder.mkdir()
    base = now.replace(second=0, microsecond=0) + timedelta(days=2)
    patients, appointments = [], []
    for index in range(1, count + 1):
        pid = f"chaos-p{index:06d}"
        patients.append(patient(pid, f"Chaos{index}", email=f"chaos.patient.{index}@example.org"))
        start = base + timedelta(minutes=15 * rng.randrange(0, 4 * 24 * 4))
        appointments.append(appointment(appointment_id(index), pid, start))
    for name, resources in (("patients", patients), ("appointments", appointments)):
        (folder / f"{name}.json").write_text(json.dumps(bundle(resources)), encoding="utf-8")
    return [appointment_id(index) for index in range(1, count + 1)]


def write_daemon_config(
    work: Path,
    index: int,
    *,
    fhir_url: str,
    paubox_url: str,
    server_port: int,
    ledger_url: str,
    args: argparse.Namespace,
) -> Path:
    """`work/config-<index>.yaml`: only the appointment-booked mapping (one email per appointment). Short
    timeouts, so that hangs become in_doubt quickly; policy hold, so that the result measures exactly-once (an
    in_doubt notification is never resent without a person); a 20 s lease, so that a killed replica's claims
    come back after 20 s rather than 5 minutes. The test server stamps strictly increasing times and nothing
    commits late, hence the short overlap, read by every poll."""
    return write_config(
        work,
        fhir_url,
        paubox_url,
        ledger_url=ledger_url,
        mappings=(MAPPING,),
        optout=False,
        name=f"config-{index}.yaml",
        source={"interval": "5s", "overlap": "1s", "sweep": "0s", "page_size": args.page_size, "retries": None},
        paubox={"connect_timeout": "2s", "read_timeout": "2s", "webhook_token": "${PAUBOX_WEBHOOK_TOKEN}"},
        dispatch={
            "interval": "1s",
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "bulk": args.bulk,
            "retry_backoff": "1s",
            "retry_backoff_max": "5s",
            "circuit_cooldown": "5s",
            "rate_limit_pause": "1s",
            "lease": "20s",
            "in_doubt": {"policy": "hold", "wait": "5s"},
        },
        server={"host": "127.0.0.1", "port": server_port},
    )


class Ledger:
    """Direct reads of the `notification` table."""

    def __init__(self, url: str) -> None:
        self.engine = ledger_engine(url)

    def states(self) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT state, count(*) FROM notification WHERE mapping = :m GROUP BY state"), {"m": MAPPING}
            )
            return Counter({state: int(count) for state, count in rows})

    def rows(self) -> list[Row]:
        with self.engine.connect() as conn:
            result = conn.execute(
                text("SELECT key, state, reason, attempts, resends, tracking_id FROM notification ORDER BY id")
            )
            return [Row(*r) for r in result]

    def close(self) -> None:
        self.engine.dispose()
