"""From a built wheel to a sent email, outside the repository: the sdist is built, the wheel is built from
the sdist, and it is installed into fresh environments in a temporary folder with pip (deploy/install.sh,
the image's install step), uv and pipx. The installed `connector` then starts the FHIR test server and the
Paubox sandbox, and `init` → `validate` → `db upgrade` → `run --once` sends real emails to the sandbox.

Dependencies come from a wheelhouse under .cache/ (git-ignored), filled from the index on the first run
only, so later runs install offline."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from connector.testing import Process
from tests.conftest import API_KEY, ROOT, free_port

pytestmark = pytest.mark.slow
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
BIN = Path(sys.executable).parent
ENV = {
    "EHR_FHIR_TOKEN": "sandbox-accepts-any-token",
    "PAUBOX_API_KEY": API_KEY,
    "PAUBOX_WEBHOOK_TOKEN": "webhook-path-token",
    "OPTOUT_KEY": base64.b64encode(bytes(32)).decode(),
}  # PAUBOX_USERNAME: replaced by base_url below


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without the repository's virtual environment or the example's variables.
    Bytecode is written: the installs skip compiling every module, the first run compiles what it imports."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", *ENV)
        and not k.startswith(("PIPX_", "UV_"))
    }
    return {**env, **extra}


def sh(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or clean_env(), text=True, capture_output=True, timeout=timeout
    )
    print(f"{time.monotonic() - started:6.1f} s  {Path(str(args[0])).name} {' '.join(map(str, args[1:3]))}")
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from the sdist (so the sdist is proven to carry everything), and its dependencies
    in the wheelhouse."""
    out = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    [built] = out.glob("connector-*.whl")
    wanted = [str(built), "pip"]  # pip: pipx upgrades the pip of its environments
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            "--dest",
            str(WHEELHOUSE),
            *wanted,
        ],
        capture_output=True,
        timeout=300,
    )
    if offline.returncode != 0:
        sh(sys.executable, "-m", "pip", "download", "--quiet", "--dest", WHEELHOUSE, *wanted, cwd=out)
    for copy in WHEELHOUSE.glob("connector-*"):
        copy.unlink()  # the wheel under test is always the one just built
    return built


@pytest.fixture(scope="module")
def pip_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("pip") / "venv"
    sh(
        "sh",
        ROOT / "deploy" / "install.sh",
        prefix,
        wheel,
        "--no-index",
        "--no-compile",
        "--find-links",
        WHEELHOUSE,
        cwd=prefix.parent,
        env=clean_env(PYTHON=sys.executable),
    )
    return prefix / "bin" / "connector"


@pytest.fixture(scope="module")
def sandboxes(pip_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The FHIR test server (with its sample appointments) and the Paubox sandbox, run by the installed
    connector."""
    work = tmp_path_factory.mktemp("sandboxes")
    fhir_port, paubox_port = free_port(), free_port()
    fhir = Process([pip_venv, "sandbox", "fhir", "--port", str(fhir_port)], work / "fhir.log", env=clean_env())
    paubox = Process(
        [pip_venv, "sandbox", "--port", str(paubox_port), "--api-key", API_KEY], work / "paubox.log", env=clean_env()
    )
    with fhir, paubox:
        fhir.wait_http(f"http://127.0.0.1:{fhir_port}/metadata")
        paubox.wait_http(f"http://127.0.0.1:{paubox_port}/_sandbox/messages")
        yield f"http://127.0.0.1:{fhir_port}", f"http://127.0.0.1:{paubox_port}"


def sent(paubox: str) -> int:
    return len(httpx.get(f"{paubox}/_sandbox/messages").json()["messages"])


def site_for(connector: Path, folder: Path, fhir: str, paubox: str) -> Path:
    """`connector init`, then the edits a person makes: their servers, no quiet hours (the test may run at
    night in the sample appointments' zone)."""
    sh(connector, "init", folder, cwd=folder.parent)
    config = folder / "config.yaml"
    text = config.read_text()
    for old, new in (
        ("base_url: https://fhir.example.org/r4", f"base_url: {fhir}"),
        ("start_from: now", "start_from: 2000-01-01T00:00:00Z"),
        ("username: ${PAUBOX_USERNAME}", f"base_url: {paubox}/v1/sandbox"),
        ("  port: 8080", f"  port: {free_port()}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(re.sub(r"^quiet_hours:.*\n(?:[ ]+\S.*\n)*", "", text, flags=re.MULTILINE))
    return config


def run_once(connector: Path, config: Path, paubox: str) -> int:
    before = sent(paubox)
    sh(connector, "run", "--once", "--config", config, cwd=config.parent, env=clean_env(**ENV))
    return sent(paubox) - before


def test_pip_install_then_init_validate_upgrade_and_run_once_send(
    pip_venv: Path, sandboxes: tuple[str, str], tmp_path: Path
) -> None:
    fhir, paubox = sandboxes
    where = sh(pip_venv.parent / "python", "-c", "import connector; print(connector.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(pip_venv.parent.parent))  # the installed copy, not the checkout
    assert sh(pip_venv, "--version", cwd=tmp_path).stdout == f"connector {version('connector')}\n"
    config = site_for(pip_venv, tmp_path / "site", fhir, paubox)
    validated = sh(pip_venv, "validate", "--config", config, cwd=tmp_path, env=clean_env(**ENV))
    assert "OK:" in validated.stdout and "EHR_SUBSCRIPTION_SECRET is not set; not needed" in validated.stdout
    sh(pip_venv, "db", "upgrade", "--config", config, cwd=tmp_path)  # no secret needed
    assert run_once(pip_venv, config, paubox) > 0
    assert run_once(pip_venv, config, paubox) == 0  # the ledger: nothing twice


def test_uv_tool_install_runs_once(wheel: Path, sandboxes: tuple[str, str], tmp_path: Path) -> None:
    fhir, paubox = sandboxes
    uv_env = clean_env(
        UV_TOOL_DIR=str(tmp_path / "tools"),
        UV_TOOL_BIN_DIR=str(tmp_path / "bin"),
        UV_CACHE_DIR=str(ROOT / ".cache" / "uv"),
    )
    sh(
        BIN / "uv",
        "tool",
        "install",
        "--python",
        sys.executable,
        "--no-index",
        "--find-links",
        WHEELHOUSE,
        wheel,
        cwd=tmp_path,
        env=uv_env,
    )
    connector = tmp_path / "bin" / "connector"
    config = site_for(connector, tmp_path / "site", fhir, paubox)
    sh(connector, "db", "upgrade", "--config", config, cwd=tmp_path)
    assert run_once(connector, config, paubox) > 0  # a new ledger: the same appointments again


def test_pipx_install_runs_once(wheel: Path, sandboxes: tuple[str, str], tmp_path: Path) -> None:
    fhir, paubox = sandboxes
    pipx_env = clean_env(
        PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"), PIPX_MAN_DIR=str(tmp_path / "man")
    )
    sh(
        BIN / "pipx",
        "install",
        "--backend",
        "pip",
        "--python",
        sys.executable,
        "--pip-args",
        f"--no-index --no-compile --find-links {WHEELHOUSE}",
        wheel,
        cwd=tmp_path,
        env=pipx_env,
    )
    connector = tmp_path / "bin" / "connector"
    config = site_for(connector, tmp_path / "site", fhir, paubox)
    sh(connector, "db", "upgrade", "--config", config, cwd=tmp_path)
    assert run_once(connector, config, paubox) > 0
