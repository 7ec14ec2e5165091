"""The example models: what each one is, how to build its image, how to make its model zip.

`make run` and the end-to-end tests build the images with `build_example_images` and register
each model under its `human_readable_id`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # JSON Schema file (relative to the example's folder) the params of its tasks must satisfy.
    params_schema_file: str | None = None
    # Deterministic: the same image, model zip, input and params may be answered from the cache.
    cacheable: bool = False
    # Build arguments besides BASE_IMAGE, as pairs: one folder can make several models.
    build_args: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.folder

    @property
    def model_available(self) -> bool:
        return self.model_zip_folder is not None

    def params_schema(self) -> dict[str, Any] | None:
        if self.params_schema_file is None:
            return None
        schema: dict[str, Any] = json.loads((self.path / self.params_schema_file).read_text())
        return schema

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
            "Foreground/brain mask for each NIfTI image (threshold by params method otsu, mean or "
            "fixed; largest component, holes filled): <name>_mask.nii.gz per image plus "
            "report.json with volumes."
        ),
        params_schema_file="params_schema.json",
        cacheable=True,
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
    ExampleModel(
        folder="linear_model",
        container_tag="inference-server/examples-linear-train:latest",
        human_readable_id="linear-train",
        description=(
            "Fits a linear model (least squares, params l2 and target) to the *.csv files in the "
            "input: weights.json and report.json. Continues from an earlier task's weights given "
            "by model_from, exactly as if trained on both data sets."
        ),
        params_schema_file="train_params_schema.json",
        cacheable=True,
        build_args=(("MODE", "train"),),
    ),
    ExampleModel(
        folder="linear_model",
        container_tag="inference-server/examples-linear-predict:latest",
        human_readable_id="linear-predict",
        description=(
            "Applies a linear-train task's weights (model_from=<its uid>) to the *.csv files in "
            "the input: each file again with a prediction column."
        ),
        cacheable=True,
        build_args=(("MODE", "predict"),),
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
                buildargs={"BASE_IMAGE": base_image, **dict(example.build_args)},
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
