"""Tiny model images for tests, built from the local base image with an inline Dockerfile.

Models are images with fixed commands, so each behaviour a test needs (fail, hang, use too
much memory, list /model, run a script) is its own image. Building them is cheap (no RUN
layers) and Docker's cache makes every build after the first nearly free; the tags are
stable, so concurrent test sessions share them and nothing needs removing.
"""

from __future__ import annotations

import io

import docker

SCRIPT = "inference-server/test-script:1"
FAIL = "inference-server/test-fail:1"
SLEEP = "inference-server/test-sleep:1"
OOM = "inference-server/test-oom:1"
LIST_MODEL = "inference-server/test-list-model:1"

_COMMANDS = {
    # Runs /model/run.sh, so one image serves every runner test: the script comes in the model dir.
    SCRIPT: '["sh", "/model/run.sh"]',
    FAIL: '["sh", "-c", "echo working on it; echo fatal: synthetic failure >&2; exit 3"]',
    SLEEP: '["sh", "-c", "echo sleeping; touch /output/started 2>/dev/null; exec sleep infinity"]',
    # Touches every page (b"x" * n writes), so the memory limit is really reached.
    OOM: '["python3", "-c", "blocks = [b\\"x\\" * (1 << 20) for _ in range(4096)]; print(len(blocks))"]',
    LIST_MODEL: (
        '["sh", "-c", "ls -la /model > /output/model-listing.txt && cat /model/* > /output/model-cat.txt"]'
    ),
}


def dockerfile_for(command_json: str) -> str:
    return (
        "ARG BASE_IMAGE=debian:bookworm-slim\n"
        "FROM ${BASE_IMAGE}\n"
        "LABEL inference-server.test-image=true\n"
        f"CMD {command_json}\n"
    )


def build_test_images(docker_client: docker.DockerClient, base_image: str) -> dict[str, str]:
    """Build every test image; returns tag -> image id."""
    ids = {}
    for tag, command in _COMMANDS.items():
        image, _ = docker_client.images.build(
            fileobj=io.BytesIO(dockerfile_for(command).encode()),
            tag=tag,
            buildargs={"BASE_IMAGE": base_image},
            rm=True,
            forcerm=True,
            pull=False,
        )
        ids[tag] = image.id
    return ids
