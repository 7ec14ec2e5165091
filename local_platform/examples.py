"""Building the example models' images and registering them, for `make run`."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import docker
import httpx

from inference_server.contract import (
    MODEL_PARAMS_SCHEMA_FIELD,
    SERVICE_TOKEN_HEADER,
    ZIP_MEDIA_TYPE,
    PrivateRoutes,
    TaskSubmitFields,
)
from models_examples.catalog import EXAMPLES, ExampleModel, build_example_images

DEFAULT_BASE_IMAGE = "inference-server/base:bookworm"


def register_model(private_url: str, service_token: str, example: ExampleModel) -> bool:
    """Register one example; False when a model with that id is already there."""
    params = {
        "container_tag": example.container_tag,
        "human_readable_id": example.human_readable_id,
        "description": example.description,
        "model_available": str(example.model_available).lower(),
        "use_gpu": str(example.use_gpu).lower(),
        "cacheable": str(example.cacheable).lower(),
    }
    headers = {SERVICE_TOKEN_HEADER: service_token}
    schema = example.params_schema()
    # A text part without a file name: the params_schema form field beside the optional zip.
    schema_part = {} if schema is None else {MODEL_PARAMS_SCHEMA_FIELD: (None, json.dumps(schema).encode())}
    with tempfile.TemporaryDirectory() as scratch:
        model_zip = example.make_model_zip(Path(scratch) / "model.zip")
        with httpx.Client(base_url=private_url, headers=headers, timeout=120) as client:
            if model_zip is None:
                response = client.post(PrivateRoutes.MODELS, params=params, files=schema_part or None)
            else:
                with open(model_zip, "rb") as handle:
                    zip_part = {TaskSubmitFields.ZIP_FILE: ("model.zip", handle, ZIP_MEDIA_TYPE)}
                    response = client.post(
                        PrivateRoutes.MODELS, params=params, files={**schema_part, **zip_part}
                    )
    if response.status_code == 409:
        return False
    if response.status_code >= 400:
        raise RuntimeError(
            f"registering {example.human_readable_id} failed: {response.status_code} {response.text[:300]}"
        )
    return True


class PodmanCopyError(RuntimeError):
    """Images could not be copied from Docker's store into Podman's."""


def podman_image_id(tag: str, podman: str = "podman") -> str | None:
    """The ID of the image `tag` names in the Podman store of this user; None when it has none."""
    completed = subprocess.run(
        [podman, "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        return None
    return completed.stdout.strip() or None


def copy_images_to_podman(
    docker_client: docker.DockerClient, tags: list[str], podman: str = "podman"
) -> list[str]:
    """Make Podman's store hold what Docker's holds under `tags` (`docker save | podman load`),
    copying only the tags whose image differs there; returns those copied. Both engines give an
    image the same ID (its configuration's digest), which is what is compared."""
    stale = []
    for tag in tags:
        docker_id = docker_client.images.get(tag).id or ""
        if podman_image_id(tag, podman) != docker_id.removeprefix("sha256:"):
            stale.append(tag)
    if not stale:
        return []
    # One archive for all of them: the layers they share (the base image's) travel once.
    save = subprocess.Popen(["docker", "save", *stale], stdout=subprocess.PIPE)
    assert save.stdout is not None
    load = subprocess.run([podman, "load"], stdin=save.stdout, capture_output=True, check=False)
    save.stdout.close()
    if save.wait() != 0 or load.returncode != 0:
        said = load.stderr.decode(errors="replace").strip()[-500:]
        raise PodmanCopyError(f"could not copy {', '.join(stale)} into Podman's store: {said}")
    return stale


def register_examples(
    private_url: str, service_token: str, container_runtime: str | None = None
) -> list[str]:
    """Build every example image from the local base image and register the models. For
    consumers on Podman the images are copied into its store too (they are built by Docker)."""
    base_image = os.environ.get("IS_BASE_IMAGE", DEFAULT_BASE_IMAGE)
    client = docker.from_env()
    try:
        build_example_images(client, base_image)
        if container_runtime == "podman":
            copy_images_to_podman(client, [example.container_tag for example in EXAMPLES])
    finally:
        client.close()
    for example in EXAMPLES:
        register_model(private_url, service_token, example)
    return [example.human_readable_id for example in EXAMPLES]
