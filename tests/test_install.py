"""Install: `connector --version` stays light, `connector init` writes a deployment folder from the examples
shipped in the package (one copy: the repository's files) and never overwrites one."""

from __future__ import annotations

import base64
import filecmp
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from tests.conftest import ROOT

HEAVY = ("fhir", "sqlalchemy", "httpx", "starlette", "jinja2", "pydantic", "typer", "alembic")


def connector(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env=env if env is not None else dict(os.environ),
        timeout=120,
    )


def test_version_prints_the_package_version_without_importing_heavy_modules() -> None:
    probe = (
        "import sys; sys.argv = ['connector', '--version']; from connector.entry import main; main(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    result = subprocess.run([sys.executable, "-c", probe, *HEAVY], text=True, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"connector {version('connector')}", "[]"]
    full = connector("--log-level", "info", "--version", cwd=ROOT)  # through the command line too
    assert full.stdout.strip() == f"connector {version('connector')}"


def test_the_package_examples_are_the_repository_files() -> None:
    examples = ROOT / "connector" / "examples"
    assert (examples / "config.example.yaml").resolve() == (ROOT / "config.example.yaml").resolve()
    assert (examples / "mappings").resolve() == (ROOT / "mappings").resolve()


def test_init_writes_config_mappings_and_env_example(tmp_path: Path) -> None:
    result = connector("init", "site", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    assert (site / "config.yaml").read_text() == (ROOT / "config.example.yaml").read_text()
    compared = filecmp.dircmp(ROOT / "mappings", site / "mappings")
    assert not compared.left_only and not compared.right_only and not compared.diff_files
    assert (site / "mappings" / "crm-examples" / "hubspot-appointment-request.yaml").is_file()
    env = (site / ".env.example").read_text()
    for line in (
        "EHR_FHIR_TOKEN=",
        "PAUBOX_USERNAME=",
        "PAUBOX_API_KEY=",
        "PAUBOX_WEBHOOK_TOKEN=",
        "EHR_SUBSCRIPTION_SECRET=",
        "# INBOX_KEY=",
        "# HUBSPOT_CLIENT_SECRET=",
    ):
        assert f"\n{line}" in env, line
    assert "not needed while sources.ehr.subscription.enabled is false" in env
    assert "# delivery.paubox.api_key (config.yaml line" in env


def test_env_example_names_every_variable_the_example_config_reads(tmp_path: Path) -> None:
    import re

    text = (ROOT / "config.example.yaml").read_text()
    documented = {"VAR", "ENV_VAR", "LEDGER_PASSWORD"}  # the header explains the syntax with these; the ledger note too
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)) - documented
    assert connector("init", cwd=tmp_path).returncode == 0
    listed = set(re.findall(r"^(?:# )?([A-Z_][A-Z0-9_]*)=", (tmp_path / ".env.example").read_text(), re.MULTILINE))
    assert listed == wanted


def test_init_refuses_to_overwrite_and_force_does(tmp_path: Path) -> None:
    assert connector("init", cwd=tmp_path).returncode == 0
    (tmp_path / "config.yaml").write_text("# mine\n")
    again = connector("init", cwd=tmp_path)
    assert again.returncode == 2
    assert "config.yaml, mappings, .env.example already exist; nothing was written" in again.stdout
    assert (tmp_path / "config.yaml").read_text() == "# mine\n"
    other = tmp_path / "other"
    (other / "mappings").mkdir(parents=True)
    (other / "mappings" / "mine.yaml").write_text("name: mine\n")
    refused = connector("init", str(other), cwd=tmp_path)
    assert refused.returncode == 2 and "mappings already exist" in refused.stdout
    assert not (other / "config.yaml").exists()
    assert connector("init", "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "config.yaml").read_text() == (ROOT / "config.example.yaml").read_text()


def test_an_initialised_folder_validates_once_its_variables_are_set(tmp_path: Path) -> None:
    assert connector("init", cwd=tmp_path).returncode == 0
    names = (
        "EHR_FHIR_TOKEN",
        "PAUBOX_USERNAME",
        "PAUBOX_API_KEY",
        "PAUBOX_WEBHOOK_TOKEN",
        "OPTOUT_KEY",
        "EHR_SUBSCRIPTION_SECRET",
    )
    bare = {k: v for k, v in os.environ.items() if k not in names}
    missing = connector("validate", cwd=tmp_path, env=bare)
    assert missing.returncode == 2
    for name in names[:5]:
        assert f"environment variable {name} is not set (export it" in missing.stdout, name
    assert (
        "warning: config.yaml line" in missing.stdout
        and "EHR_SUBSCRIPTION_SECRET is not set; not needed" in missing.stdout
    )
    values = {name: "placeholder" for name in names[:4]} | {"OPTOUT_KEY": base64.b64encode(bytes(32)).decode()}
    ready = connector("validate", cwd=tmp_path, env={**bare, **values})
    assert ready.returncode == 0, ready.stdout
    assert "OK: config.yaml with 1 source(s) and 5 mapping(s)" in ready.stdout
