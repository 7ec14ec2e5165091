#!/bin/sh
# Honours the official image's RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS by writing them to
# rabbitmq.conf, then runs the server in the foreground as user rabbitmq.
set -eu

cat >/etc/rabbitmq/rabbitmq.conf <<CONF
listeners.tcp.default = 5672
# Clients connect from other containers, so the default user must not be loopback-only.
loopback_users = none
default_user = ${RABBITMQ_DEFAULT_USER:-guest}
default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}
# Logs to stdout, where docker logs finds them, as in the official image.
log.console = true
log.console.level = info
log.file = false
CONF
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq

if [ "$1" = rabbitmq-server ]; then
    shift
    cd /var/lib/rabbitmq
    export HOME=/var/lib/rabbitmq
    # exec, not Debian's su wrapper: the server script must be PID 1 so `docker stop`'s SIGTERM
    # reaches its trap and stops RabbitMQ cleanly instead of timing out into SIGKILL.
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
