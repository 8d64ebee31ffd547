#!/bin/sh
# Install connector from its wheel into a virtual environment of its own. The container image runs this
# script (Dockerfile); so can a host for the systemd unit, and tests/test_deploy.py runs it in a fresh
# folder.
#   deploy/install.sh PREFIX WHEEL [pip options...]
#   deploy/install.sh /opt/connector dist/connector-0.1.0-py3-none-any.whl
# Extra options go to pip, e.g. `--no-index --find-links wheelhouse/` to install without an index.
# PYTHON chooses the interpreter (default python3, which must be 3.11 or newer).
set -eu
if [ "$#" -lt 2 ]; then
  echo "usage: $0 PREFIX WHEEL [pip options...]" >&2
  exit 2
fi
prefix=$1
wheel=$2
shift 2
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$@" "$wheel"
"$prefix/bin/connector" --version
