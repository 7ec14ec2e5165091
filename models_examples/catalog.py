"""The example models: what each one is, how to build its image, how to make its model zip.

`make run` and the end-to-end tests build the images with `build_example_images` and register
each model under its `human_readable_id`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from inference_server.zipsafe import zip_directory

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExampleModel:
    folder: str
    container_tag: str
    human_readable_id: str
    description: str
    use_gpu: bool = False
    # Folder (relative to the example's folder) zipped as the model zip, unpacked at /model.
    model_zip_folder: str | None = None

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.folder

    @property
    def model_available(self) -> bool:
        return self.model_zip_folder is not None

    def make_model_zip(self, dest: Path) -> Path | None:
        """Zip the model files into `dest` (a file path); None when the model has no zip."""
        if self.model_zip_folder is None:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        zip_directory(self.path / self.model_zip_folder, dest)
        return dest


EXAMPLES: tuple[ExampleModel, ...] = (
    ExampleModel(
        folder="passthrough",
        container_tag="inference-server/examples-passthrough:latest",
        human_readable_id="passthrough",
        description="Copies every input file to the output unchanged, folders kept.",
    ),
    ExampleModel(
        folder="brain_mask",
        container_tag="inference-server/examples-brain-mask:latest",
        human_readable_id="brain-mask",
        description=(
            "Foreground/brain mask for each NIfTI image (Otsu threshold, largest component, "
            "holes filled): <name>_mask.nii.gz per image plus report.json with volumes."
        ),
    ),
    ExampleModel(
        folder="weights_reader",
        container_tag="inference-server/examples-weights-reader:latest",
        human_readable_id="weights-reader",
        description=(
            "Applies the scale/offset in its model zip (/model/weights.json) to the numbers in *.txt files."
        ),
        model_zip_folder="model",
    ),
)


def get_example(human_readable_id: str) -> ExampleModel:
    for example in EXAMPLES:
        if example.human_readable_id == human_readable_id:
            return example
    raise KeyError(f"no example model {human_readable_id!r}")


@dataclass(frozen=True)
class BuiltImage:
    example: ExampleModel
    image_id: str


class ExampleBuildError(RuntimeError):
    """An example image failed to build; the message ends with the build's last output lines."""


def build_example_images(
    docker_client: docker.DockerClient,
    base_image: str,
    examples: tuple[ExampleModel, ...] | list[ExampleModel] = EXAMPLES,
) -> list[BuiltImage]:
    """Build (or, thanks to Docker's layer cache, cheaply rebuild) each example's image.

    Uses the classic builder through the Docker API, which resolves `base_image` from the local
    engine without pulling, so it works where no registry is reachable.
    """
    built = []
    for example in examples:
        log.info("building %s from %s", example.container_tag, base_image)
        try:
            image, _ = docker_client.images.build(
                path=str(example.path),
                tag=example.container_tag,
                buildargs={"BASE_IMAGE": base_image},
                rm=True,
                forcerm=True,
                pull=False,
            )
        except docker.errors.BuildError as exc:
            lines = [str(chunk.get("stream") or chunk.get("error") or "").rstrip() for chunk in exc.build_log]
            tail = "\n".join(line for line in lines if line)[-3000:]
            raise ExampleBuildError(f"building {example.container_tag} failed: {exc.msg}\n{tail}") from exc
        if image.id is None:  # the engine names every image it builds
            raise ExampleBuildError(f"building {example.container_tag} gave an image without an id")
        built.append(BuiltImage(example=example, image_id=image.id))
    return built
