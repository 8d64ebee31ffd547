"""The benchmark's rig: the processes it starts (servers and workers, through `connector.testing`), the
spec of each run, and one pipeline run measured against what the sandbox accepted."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.table import log
from connector.testing import API_KEY, USERNAME, HarnessError, Process, sqlite_url, write_config

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class Processes:
    """Every process this benchmark starts; stopped by their own handles at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[Process] = []

    def start(self, module: str, *args: str, log_name: str, name: str, python: str | Path = PY) -> Process:
        """`python -m MODULE ARGS` from the checkout (this interpreter unless `python`), its stdout a pipe and
        its stderr in `log_name`."""
        # The benchmark's own session, as before the harness: how the CPU is shared under load stays the same.
        argv, log_path = [str(python), "-m", module, *args], self.folder / log_name
        process = Process(argv, log_path, cwd=ROOT, name=name, pipe_stdout=True, grace=15, new_session=False)
        self.running.append(process.start())
        return process

    def server(self, kind: str, *args: str, timeout: float = 180) -> tuple[Process, str]:
        """A server of bench/servers.py in its own process, and its URL once it listens."""
        process = self.start("bench.servers", kind, *args, log_name=f"{kind}-server.log", name=f"the {kind} server")
        return process, str(json.loads(process.read_line(timeout))["url"])

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)

    def finish(self, process: Process, timeout: float) -> dict[str, Any]:
        """The last JSON line a worker prints, once it exits 0 within `timeout`; with `log` (its log file)."""
        out = process.communicate(timeout)
        self.running.remove(process)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise HarnessError(
                f"{process.name} failed (exit {process.returncode}); last log lines:\n{process.log_text(tail=3000)}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        result["log"] = str(process.log_path)
        return result

    def worker(self, role: str, spec: dict[str, Any], timeout: float, name: str) -> dict[str, Any]:
        """One measurement in a fresh process of bench/workers.py; its result."""
        process = self.start("bench.workers", role, json.dumps(spec), log_name=f"{name}.log", name=name)
        return self.finish(process, timeout)


def poll_seconds(result: dict[str, Any]) -> float | None:
    """When the poll ended, from the connector's own `poll.done` log line (console format)."""
    for line in Path(result["log"]).read_text().splitlines():
        if "poll.done" in line:
            try:
                ended = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
                return ended - float(result["started_at"])
            except ValueError:
                return None
    return None


def sandbox(url: str, method: str, path: str) -> Any:
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.request(method, path)
        response.raise_for_status()
        return response.json()


@dataclass
class Rig:
    procs: Processes
    root: Path
    ram: Path | None
    paubox: str
    page_size: int
    runs: int = 0

    def default_config(self, folder: Path, fhir: str, **extra: Any) -> Path:
        """A config of the product's defaults in `folder` (its SQLite ledger there, the shipped booked mapping,
        no opt-out keys, dispatch every 10 s): what start-up, `connector check` and the Subscription run read.
        `extra`: more of `connector.testing.write_config`'s settings."""
        folder.mkdir(parents=True, exist_ok=True)
        return write_config(
            folder,
            fhir,
            self.paubox,
            ledger_url=sqlite_url(folder / "ledger.db"),
            mappings=("appointment-booked",),
            optout=False,
            source={"page_size": None, "retries": None},
            dispatch={"interval": "10s", "retry_backoff": None, "bulk": None},
            **extra,
        )

    def spec(self, fhir: str, dispatch: dict[str, int], ledger_dir: Path, **extra: Any) -> dict[str, Any]:
        self.runs += 1
        work = self.root / f"run{self.runs}"
        ledger_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "workdir": str(work),
            "fhir": fhir,
            "paubox": self.paubox,
            "page_size": self.page_size,
            "ledger": str(ledger_dir / f"ledger{self.runs}.db"),
            "dispatch": dispatch,
            "api_key": API_KEY,
            **extra,
        }
        return {**spec, "config": str(run_config(spec))}


def run_config(spec: dict[str, Any]) -> Path:
    """The config of one run: the bench's dispatch settings, only the appointment-booked mapping, a SQLite
    ledger, the source's poll settings; no retry or opt-out settings beyond the product's defaults."""
    folder = Path(spec["workdir"])
    folder.mkdir(parents=True, exist_ok=True)
    dispatch = spec["dispatch"]
    return write_config(
        folder,
        spec["fhir"],
        spec["paubox"],
        ledger_url=sqlite_url(Path(spec["ledger"])),
        mappings=("appointment-booked",),
        optout=False,
        source={
            "page_size": spec["page_size"],
            "interval": spec.get("source_interval", "60s"),
            "overlap": spec.get("overlap", "5m"),
            "sweep": spec.get("sweep", "1m"),
            "retries": None,
        },
        dispatch={
            "interval": None,
            "retry_backoff": None,
            "concurrency": dispatch["concurrency"],
            "batch_size": dispatch["batch_size"],
            "bulk": dispatch["bulk"],
        },
    )


def naive_auth() -> dict[str, str]:
    """What the naive loop needs to post to the sandbox: its key and API username."""
    return {"api_key": API_KEY, "username": USERNAME}


def pipeline_run(
    rig: Rig, fhir: str, dispatch: dict[str, int], expected: int, ram: bool, name: str, profile: str | None = None
) -> dict[str, Any]:
    sandbox(rig.paubox, "DELETE", "/_sandbox/messages")
    ledger_dir = (rig.ram if ram and rig.ram else rig.root) / f"ledger-{rig.runs + 1}"
    spec = rig.spec(fhir, dispatch, ledger_dir, profile=profile)
    result = rig.procs.worker("pipeline", spec, timeout=max(180, expected / 10), name=name)
    stats = sandbox(rig.paubox, "GET", "/_sandbox/stats")
    result["accepted"] = stats["accepted"]
    result["most_copies"] = max(stats["per_key"].values(), default=0)
    result["rate"] = result["sent"] / result["elapsed"]
    result["poll_seconds"] = poll_seconds(result)
    shutil.rmtree(ledger_dir, ignore_errors=True)
    problem = (
        ""
        if result["sent"] == expected == result["accepted"] and result["most_copies"] == 1
        else f" (CHECK: sent {result['sent']}, sandbox accepted {result['accepted']}, counts {result['counts']})"
    )
    log(f"{name}: {result['sent']} in {result['elapsed']:.1f} s = {result['rate']:,.0f}/s{problem}")
    result["problem"] = problem
    return result


def describe_dispatch(dispatch: dict[str, int]) -> str:
    how = f"bulk {dispatch['bulk']}" if dispatch["bulk"] > 1 else "one by one"
    return f"{how}, concurrency {dispatch['concurrency']}, batch {dispatch['batch_size']}"
