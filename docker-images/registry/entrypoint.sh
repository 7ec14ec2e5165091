#!/bin/sh
# With REGISTRY_USER and a password file (REGISTRY_PASSWORD_FILE, a stack secret), the registry
# asks for that login (htpasswd, bcrypt) before any push or pull; without them it is open, which
# only suits a registry no one outside the swarm can reach.
set -eu
if [ -n "${REGISTRY_USER:-}" ] && [ -n "${REGISTRY_PASSWORD_FILE:-}" ]; then
    htpasswd -Bbc /etc/docker/registry/htpasswd "$REGISTRY_USER" "$(cat "$REGISTRY_PASSWORD_FILE")" 2>/dev/null
    export REGISTRY_AUTH=htpasswd
    export REGISTRY_AUTH_HTPASSWD_REALM="${REGISTRY_AUTH_REALM:-inference-server registry}"
    export REGISTRY_AUTH_HTPASSWD_PATH=/etc/docker/registry/htpasswd
fi
exec "$@"
