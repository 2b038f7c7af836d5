#!/usr/bin/env bash
# Make sure node and npm are on PATH (buf for `make proto-check`, and the Node client example).
# Where they are missing we install Debian's packages, as scripts/ensure_postgres.sh does for
# PostgreSQL, so `make test` runs on a fresh machine.
set -euo pipefail
if command -v node >/dev/null && command -v npm >/dev/null; then
  echo "node: $(node --version), npm $(npm --version)"; exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
echo "node: installing Debian's nodejs and npm packages"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
echo "node: $(node --version), npm $(npm --version)"
