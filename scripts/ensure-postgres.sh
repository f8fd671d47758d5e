#!/usr/bin/env bash
# The test suite starts its own throwaway PostgreSQL cluster (tests/pgserver.py); this makes sure
# the server binaries are installed. Debian's package, installed with apt-get when missing.
set -euo pipefail
if [ -n "${LABSYNC_TEST_POSTGRES_URL:-}" ]; then exit 0; fi
if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then exit 0; fi
echo "labsync: installing the PostgreSQL server (Debian package 'postgresql') for the tests"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/postgres >/dev/null
