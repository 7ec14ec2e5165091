#!/usr/bin/env bash
# Makes the local base image that model and service Dockerfiles build on (ARG BASE_IMAGE).
# Where a registry answers, it is debian:bookworm-slim plus python3; where none does, the same
# Debian release is bootstrapped from the machine's own apt mirror and imported.
# Usage: build_base_image.sh IMAGE_TAG CACHE_DIR
set -euo pipefail

IMAGE="${1:?image tag}"
CACHE_DIR="${2:?cache dir}"
PACKAGES="python3,ca-certificates"
ROOTFS_TAR="$CACHE_DIR/base-bookworm-rootfs.tar"

say() { echo "[base-image] $*" >&2; }

mkdir -p "$CACHE_DIR"

if [ -s "$ROOTFS_TAR" ]; then
    say "importing cached root file system $ROOTFS_TAR as $IMAGE"
    docker import "$ROOTFS_TAR" "$IMAGE" >/dev/null
    exit 0
fi

if timeout 30 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    say "building $IMAGE from debian:bookworm-slim"
    printf 'FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates && rm -rf /var/lib/apt/lists/*\n' \
        | docker build -q -t "$IMAGE" - >/dev/null
    exit 0
fi

# No registry: bootstrap from the mirror apt already uses, read at run time.
mirror=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror="$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/debian.sources | grep -v -- '-security' | head -n1)"
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)"
fi
[ -n "$mirror" ] || { echo "[base-image] ERROR: no Debian mirror found in the apt sources" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "no registry reachable: debootstrap bookworm (minbase + $PACKAGES) from the apt mirror"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
# Trust the same CA bundle as the host, so apt and pip inside builds behave like on the host.
cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" -cf "$ROOTFS_TAR.partial" .
mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
docker import "$ROOTFS_TAR" "$IMAGE" >/dev/null
say "built $IMAGE"
