#!/bin/sh
# The engine of a worker node. A worker whose container was killed hard (the tests' lost host)
# starts again with the pid files and sockets of the killed engine still in its /run, which
# dockerd and containerd take for a running instance: they are stale here, since this container
# runs nothing before this script.
set -eu
rm -f /var/run/docker.pid /var/run/docker.sock
rm -rf /var/run/docker/containerd /run/containerd
exec dockerd "$@"
