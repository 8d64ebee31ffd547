"""Child processes of a test's world: `connector run` daemons, the CLI, servers and workers in processes of
their own. Each child writes its output to a log file; the handle starts, signals, stops and restarts it, and
waits for it to answer, failing with the end of its log when it exits instead."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar

import httpx

from connector.testing.errors import HarnessError
from connector.testing.servers import API_KEY

T = TypeVar("T")


def environment(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides`, for a child."""
    return {**os.environ, **overrides}


def connector_argv(*args: str) -> list[str]:
    """The command line of `connector ARGS` with this interpreter (the checkout's or the venv's package)."""
    return [sys.executable, "-m", "connector", *args]


class Process:
    """A child process whose stdout and stderr go to `log_path` (stdout to a pipe instead with `pipe_stdout`).

    `with Process(...) as child:` starts it and stops it at the end (SIGTERM, then SIGKILL after `grace`
    seconds); `start` may be called again after it ended (a restart), adding a marked section to the same log.
    It runs in a session of its own, so that a Ctrl-C in a terminal reaches only its parent, which then stops
    it in order; `new_session=False` keeps it in its parent's (Linux's autogroup scheduling shares the CPU
    between sessions as between programs, which matters to a benchmark on a busy machine)."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        pipe_stdout: bool = False,
        grace: float = 30,
        new_session: bool = True,
    ) -> None:
        self.argv = [str(part) for part in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd or log_path.parent
        self.name = name or Path(self.argv[0]).name
        self.pipe_stdout = pipe_stdout
        self.grace = grace
        self.new_session = new_session
        self.popen: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self._terminated = False

    def start(self, note: str = "start") -> Process:
        """Start it (again); `note` heads its section of the log."""
        if self.alive():
            raise HarnessError(f"{self.name} is running already")
        self._close_log()
        self._terminated = False
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== {self.name}: {note} at {datetime.now(UTC).isoformat()} =====\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(  # noqa: S603 - a command line built by the caller, no shell
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.pipe_stdout else self._log,
            stderr=self._log if self.pipe_stdout else subprocess.STDOUT,
            text=True,
            start_new_session=self.new_session,
        )
        return self

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended (negative: the signal that ended it), else None."""
        return self.popen.poll() if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send `signum` if it still runs."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Its exit status, waiting at most `timeout` seconds (subprocess.TimeoutExpired after that)."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        return self.popen.wait(timeout=timeout)

    def kill(self) -> int:
        """SIGKILL, as a crash would: nothing runs in the child after it. Returns the exit status."""
        self.signal(signal.SIGKILL)
        return self.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM, once: a second one during a graceful stop would reach Python's default handler."""
        if self.alive() and not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds (default: the handle's). Returns the exit status (None
        when it was never started)."""
        if self.popen is None:
            return None
        if self.alive():
            self.terminate()
            try:
                self.popen.wait(timeout=self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._close_log()
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self if self.alive() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self, tail: int | None = None) -> str:
        """Its log so far (the last `tail` characters only, when given)."""
        if self._log is not None:
            self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text

    def _failure(self, what: str) -> HarnessError:
        return HarnessError(f"{self.name} {what}; the end of {self.log_path}:\n{self.log_text(tail=3000)}")

    def wait_until(self, check: Callable[[], T], seconds: float = 40, interval: float = 0.1) -> T:
        """The first true value `check()` returns, asked every `interval` seconds. HarnessError (with the end
        of the log) when the process exits first, or after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            if not self.alive():
                raise self._failure(f"exited with status {self.returncode}")
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise self._failure(f"did not get there within {seconds:.0f} s")
            time.sleep(interval)

    def wait_http(self, url: str, seconds: float = 60) -> None:
        """Wait until `url` answers with a status below 500 (the child listens and serves)."""

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url, timeout=2).status_code < 500
            return False

        self.wait_until(answers, seconds, interval=0.2)

    def read_line(self, timeout: float) -> str:
        """The next line of its stdout (with `pipe_stdout`); HarnessError when none comes within `timeout`."""
        stdout = self.popen.stdout if self.popen is not None else None
        if stdout is None:
            raise HarnessError(f"{self.name}: its stdout is not a pipe")
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise self._failure(f"printed no line within {timeout:.0f} s")
        return line

    def communicate(self, timeout: float) -> str:
        """All of its stdout (with `pipe_stdout`) once it ended; stopped, and HarnessError, after `timeout`."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        try:
            out, _ = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(grace=15)
            raise self._failure(f"did not finish within {timeout:.0f} s") from None
        self._close_log()
        return out or ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def daemon(
    config: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_name: str = "daemon.log",
    name: str = "connector run",
) -> Process:
    """`connector run --config CONFIG` as a child (not started yet), run in `cwd` (default: the config's
    folder) with its output in `cwd/log_name`; the environment defaults to this one with the sandbox's key."""
    folder = cwd or config.parent
    return Process(
        connector_argv("run", "--config", str(config)),
        folder / log_name,
        env=env if env is not None else environment(PAUBOX_API_KEY=API_KEY),
        cwd=folder,
        name=name,
    )


def cli(
    *args: str | Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `connector ARGS` to its end in `cwd` and return what it printed. With `check`, a non-zero exit is a
    HarnessError carrying both outputs. The environment defaults to this one with the sandbox's key."""
    argv = connector_argv(*(str(arg) for arg in args))
    result = subprocess.run(  # noqa: S603 - our own CLI, arguments built by the caller
        argv,
        cwd=cwd,
        env=env if env is not None else environment(PAUBOX_API_KEY=API_KEY),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise HarnessError(
            f"connector {' '.join(argv[3:])} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result
