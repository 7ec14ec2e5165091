# The platform's one service image: private_api, public_api and job_consumer differ only in the
# command (see docker-compose.yaml). Build with scripts/build_images.sh, or anywhere with
#   docker build -t inference-server/app .
# BASE_IMAGE must be a Debian-family image with Python 3.11+ (python:3.11-slim, or the local
# inference-server/base:bookworm where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Dependency layer first, so editing the source does not reinstall every dependency.
# build/wheels holds wheels made on the host by scripts/build_images.sh where containers cannot
# reach the package index; the glob matches nothing on a machine without it, and pip then uses
# the index.
COPY docker-images/app/install.sh /usr/local/sbin/install-into-venv
COPY pyproject.toml build/wheel[s] /tmp/wheels/
RUN install-into-venv dependencies /tmp/wheels/pyproject.toml
# .dockerignore lets in only the packages, pyproject.toml and README.md: never .env or certs.
COPY . /src
RUN install-into-venv project /src

FROM ${BASE_IMAGE}
ARG APP_UID=10001
# The static shell that holds a consumer's containers started ahead (job_consumer/container_gate.py).
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static \
    && rm -rf /var/lib/apt/lists/*
# Consumers override the user (root, or this user plus the docker group) to reach the docker
# socket; the APIs run as this unprivileged user.
RUN set -eu; \
    groupadd --system --gid "$APP_UID" app; \
    useradd --system --uid "$APP_UID" --gid app --home-dir /var/lib/inference-server --no-create-home \
        --shell /usr/sbin/nologin app; \
    mkdir -p /var/lib/inference-server/data /var/lib/inference-server/work; \
    chown -R app:app /var/lib/inference-server
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IS_DATA_DIR=/var/lib/inference-server/data \
    IS_WORK_DIR=/var/lib/inference-server/work
WORKDIR /var/lib/inference-server
USER app
EXPOSE 8000 8001
# Every service answers /health/live; compose overrides the port per service.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]
CMD ["python", "-m", "public_api", "--host", "0.0.0.0", "--port", "8000"]
