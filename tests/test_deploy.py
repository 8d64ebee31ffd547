"""Deployment artefacts, checked without a container engine or a running systemd: the Dockerfile passes
hadolint, compose.yaml follows the Compose specification, the systemd unit passes `systemd-analyze verify`.
(The image's install step, deploy/install.sh, runs in a fresh virtual environment in test_wheel.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: ./scripts/bootstrap installs the dev tools")
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n\s*", " ", "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    )
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in joined.splitlines() if line.strip())
    ]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], text=True, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    bad = subprocess.run(
        [tool("hadolint"), "-"],
        input="FROM python\nRUN pip install build\n",
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DL3013" in bad.stdout  # the linter does check: unpinned pip install


def test_image_builds_the_wheel_then_installs_only_it_with_the_script_as_a_non_root_user() -> None:
    steps = instructions((ROOT / "Dockerfile").read_text())
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    final = steps[max(index for index, (word, _) in enumerate(steps) if word == "FROM") :]
    runs = " ".join(args for word, args in final if word == "RUN")
    assert "install-connector /opt/connector /tmp/dist/connector-*.whl" in runs
    assert ("COPY", "deploy/install.sh /usr/local/bin/install-connector") in final
    assert ("COPY", "--from=build /dist/ /tmp/dist/") in final
    assert not any(word == "COPY" and "connector" in args.split()[0] for word, args in final)  # no sources
    user = [args for word, args in final if word == "USER"][-1]
    assert not user.startswith(("0", "root"))
    assert dict(final)["ENTRYPOINT"] == '["connector"]' and dict(final)["CMD"] == '["run"]'
    assert "/livez" in dict(final)["HEALTHCHECK"]


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["connector"]["command"] == ["run"]
    assert services["connector"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert "postgresql+psycopg://" in services["connector"]["environment"]["LEDGER_URL"]
    sandboxes = {name for name, service in services.items() if "sandbox" in service.get("profiles", [])}
    assert sandboxes == {"fhir-sandbox", "paubox-sandbox"}


def test_systemd_unit_passes_verify_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    text = (ROOT / "deploy" / "connector.service").read_text()
    for option in (
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/connector",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "EnvironmentFile=/etc/connector/connector.env",
        "Restart=on-failure",
    ):
        assert f"\n{option}\n" in text, option
    # verify checks that the programs exist: point them at this checkout's connector instead of /opt.
    unit = tmp_path / "connector.service"
    unit.write_text(text.replace("/opt/connector/bin/connector", str(BIN / "connector")))
    result = subprocess.run([analyze, "verify", str(unit)], text=True, capture_output=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], text=True, capture_output=True, timeout=60
    )
    print(security.stdout.strip().splitlines()[-1] if security.stdout.strip() else security.stderr)
