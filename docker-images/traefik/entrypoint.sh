#!/bin/sh
# Same argument handling as the official image: flags alone, or a traefik subcommand, run traefik.
set -e
case "${1:-}" in
    -*) set -- traefik "$@" ;;
    healthcheck | version | traefik) [ "$1" = traefik ] || set -- traefik "$@" ;;
esac
exec "$@"
