#!/usr/bin/env bash
# Make sure a PostgreSQL server answers for the integration tests (DIREDI_TEST_PG_DSN).
# On these machines one normally runs already (127.0.0.1:5432, trust auth, database `test`); where
# none answers we install Debian's package if needed and start a cluster, so the suite runs anywhere.
set -euo pipefail
host=127.0.0.1 port=5432
answers() { pg_isready -q -h "$host" -p "$port" 2>/dev/null || (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
if answers; then echo "postgres: answering on $host:$port"; exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "postgres: installing Debian's postgresql package"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
ver=$(ls /etc/postgresql | sort -V | tail -1)
conf=/etc/postgresql/$ver/main
# trust auth on loopback for the test database only: this is a throw-away CI cluster
if ! grep -q "diredi-ci" "$conf/pg_hba.conf"; then
  $SUDO sed -i '1i host all all 127.0.0.1/32 trust # diredi-ci\nlocal all all trust # diredi-ci' "$conf/pg_hba.conf"
fi
$SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
for _ in $(seq 1 30); do answers && break; sleep 1; done
answers || { echo "postgres: could not start a server on $host:$port" >&2; exit 1; }
psql -h "$host" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h "$host" -U postgres -c "CREATE DATABASE test" >/dev/null
echo "postgres: started on $host:$port"
