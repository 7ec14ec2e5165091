#!/bin/sh
# Installs into the image's virtualenv /opt/venv, from the host-built wheels in /tmp/wheels when
# there are any (offline), else from the package index. Runs inside `docker build` only.
# Usage: install-into-venv dependencies PYPROJECT | install-into-venv project SRC_DIR
set -eu

VENV=/opt/venv
WHEELS=/tmp/wheels
what="$1"
target="$2"

pip_wheel="$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -n 1 || true)"
if [ ! -x "$VENV/bin/python" ]; then
    # --without-pip: Debian's python3 lacks ensurepip; pip runs from its wheel or the system.
    python3 -m venv --without-pip "$VENV"
fi

pip_install() {
    if [ -n "$pip_wheel" ]; then
        # A pip wheel is runnable as is; it installs into the interpreter that runs it.
        "$VENV/bin/python" "$pip_wheel/pip" install --no-cache-dir --disable-pip-version-check \
            --no-index --find-links "$WHEELS" "$@"
    else
        if ! python3 -m pip --version >/dev/null 2>&1; then
            apt-get update -q && apt-get install -y -q --no-install-recommends python3-pip
            rm -rf /var/lib/apt/lists/*
        fi
        python3 -m pip --python "$VENV/bin/python" install --no-cache-dir --disable-pip-version-check "$@"
    fi
}

case "$what" in
    dependencies)
        # Only the runtime dependencies named in pyproject.toml, so this layer is cached until
        # they change.
        "$VENV/bin/python" - "$target" >/tmp/requirements.txt <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
PY
        pip_install -r /tmp/requirements.txt
        ;;
    project)
        # pip byte-compiles as it installs: the APIs run as a user that cannot write /opt/venv.
        pip_install --no-deps "$target"
        ;;
    *)
        echo "usage: $0 dependencies PYPROJECT | project SRC_DIR" >&2
        exit 2
        ;;
esac
