"""The example models: catalog, Dockerfiles, and each image run in the consumer's sandbox."""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from inference_server.contract import CONTAINER_TAG_RE, HUMAN_READABLE_ID_RE
from job_consumer.runner import ModelRunner, RunResult
from models_examples.catalog import EXAMPLES, ExampleModel, get_example
from tests.job_consumer.helpers import make_model


class TaskDirs:
    def __init__(self, root: Path) -> None:
        self.input = root / "input"
        self.output = root / "output"
        self.input.mkdir(parents=True)
        self.output.mkdir()
        os.chmod(self.output, 0o777)


def run_example(
    runner: ModelRunner,
    example: ExampleModel,
    dirs: TaskDirs,
    model_dir: Path | None = None,
    params: dict | None = None,
) -> RunResult:
    model = make_model(
        example.container_tag,
        human_readable_id=example.human_readable_id,
        model_available=model_dir is not None,
    )
    params_file = None
    if params is not None:
        # Where the consumer would put it: beside the task's folders, mounted at /params.json.
        params_file = dirs.input.parent / "params.json"
        params_file.write_text(json.dumps(params))
    return runner.run(
        task_uid=f"example{secrets.token_hex(8)}",
        model=model,
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=model_dir,
        params_file=params_file,
    )


# --- the catalog and the Dockerfiles (no Docker needed) --------------------------------------


def test_catalog_entries_are_valid_and_unique():
    assert {e.human_readable_id for e in EXAMPLES} == {
        "passthrough",
        "brain-mask",
        "weights-reader",
        "linear-train",
        "linear-predict",
    }
    assert len({e.container_tag for e in EXAMPLES}) == len(EXAMPLES)
    for example in EXAMPLES:
        assert HUMAN_READABLE_ID_RE.match(example.human_readable_id)
        assert CONTAINER_TAG_RE.match(example.container_tag)
        assert example.description
        assert example.use_gpu is False
        assert (example.path / "README.md").is_file()
        if example.model_zip_folder is not None:
            assert (example.path / example.model_zip_folder).is_dir()
        schema = example.params_schema()
        if schema is not None:
            assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert get_example("weights-reader").model_available
    with pytest.raises(KeyError):
        get_example("no-such-example")


def test_every_dockerfile_takes_its_base_image_as_a_build_arg():
    for example in EXAMPLES:
        lines = (example.path / "Dockerfile").read_text().splitlines()
        assert lines[:2] == ["ARG BASE_IMAGE=debian:bookworm-slim", "FROM ${BASE_IMAGE}"], example.folder


def test_model_zip_is_made_from_the_model_folder(tmp_path):
    example = get_example("weights-reader")
    zip_path = example.make_model_zip(tmp_path / "weights.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["weights.json"]
        weights = json.loads(archive.read("weights.json"))
    assert weights["scale"] == 2.5
    assert get_example("passthrough").make_model_zip(tmp_path / "none.zip") is None


# --- the images, run as the consumer runs them -------------------------------------------------


@pytest.mark.docker
def test_example_images_build_from_the_local_base_image(example_images, docker_client, base_image):
    assert [built.example for built in example_images] == list(EXAMPLES)
    base_id = docker_client.images.get(base_image).id
    for built in example_images:
        image = docker_client.images.get(built.example.container_tag)
        assert image.id == built.image_id
        # Built on the local base image (its layers are a prefix), not on a pulled one.
        history_ids = {layer["Id"] for layer in image.history()}
        assert base_id in history_ids, built.example.container_tag


@pytest.mark.docker
def test_passthrough_copies_nested_input(example_images, example_runner, tmp_path):
    dirs = TaskDirs(tmp_path / "task")
    files = {"scan.bin": os.urandom(20_000), "series/1/slice 001.dcm": b"DICM" * 100, "notes.txt": b"hi\n"}
    for name, data in files.items():
        (dirs.input / name).parent.mkdir(parents=True, exist_ok=True)
        (dirs.input / name).write_bytes(data)

    result = run_example(example_runner, get_example("passthrough"), dirs)

    assert result.exit_code == 0, result.logs
    for name, data in files.items():
        assert (dirs.output / name).read_bytes() == data
    assert "copied series/1/slice 001.dcm" in result.logs
    assert "copied 3 file(s)" in result.logs


def synthetic_head(shape=(40, 48, 44), zooms=(1.0, 1.2, 1.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy background, a bright ellipsoid "brain" with a dark core, and a detached bright speck."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    volume = rng.normal(10, 3, shape).astype(np.float32)
    brain = ((z - 20) / 14) ** 2 + ((y - 24) / 17) ** 2 + ((x - 22) / 15) ** 2 < 1
    volume[brain] += 100
    volume[18:22, 22:26, 20:24] = 5  # a dark hole inside: must be filled
    volume[1:3, 1:3, 1:3] = 120  # bright speck outside: not the largest component
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-20.0, -30.0, 10.0]
    return volume, affine, brain


@pytest.mark.docker
def test_brain_mask_writes_masks_and_report(example_images, example_runner, tmp_path):
    dirs = TaskDirs(tmp_path / "task")
    volume, affine, brain = synthetic_head()
    (dirs.input / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, affine), dirs.input / "sub-01" / "anat" / "T1w.nii.gz")
    nib.save(nib.Nifti1Image(volume[::2, ::2, ::2].copy(), affine), dirs.input / "small.nii")

    result = run_example(example_runner, get_example("brain-mask"), dirs)

    assert result.exit_code == 0, result.logs
    mask_image = nib.load(dirs.output / "sub-01" / "anat" / "T1w_mask.nii.gz")
    mask = np.asanyarray(mask_image.dataobj)
    assert mask.shape == volume.shape
    assert mask.dtype == np.uint8
    assert np.allclose(mask_image.affine, affine)
    assert mask[20, 24, 22] == 1  # the hole was filled
    assert mask[2, 2, 2] == 0  # the detached speck was dropped
    overlap = np.logical_and(mask == 1, brain).sum() / brain.sum()
    assert overlap > 0.97
    assert (dirs.output / "small_mask.nii.gz").is_file()

    report = json.loads((dirs.output / "report.json").read_text())
    entry = next(e for e in report["images"] if e["input"] == "sub-01/anat/T1w.nii.gz")
    assert entry["mask"] == "sub-01/anat/T1w_mask.nii.gz"
    assert entry["voxels_in_mask"] == int(mask.sum())
    assert entry["voxels_total"] == mask.size
    assert entry["mask_volume_ml"] == pytest.approx(mask.sum() * 1.0 * 1.2 * 1.5 / 1000, rel=1e-4)
    assert 10 < entry["threshold"] < 110
    assert len(report["images"]) == 2 and "errors" not in report


@pytest.mark.docker
def test_brain_mask_without_nifti_input_fails_clearly(example_images, example_runner, tmp_path):
    dirs = TaskDirs(tmp_path / "task")
    (dirs.input / "readme.txt").write_text("not an image")

    result = run_example(example_runner, get_example("brain-mask"), dirs)

    assert result.exit_code == 2
    assert "no NIfTI files" in result.logs
    assert list(dirs.output.iterdir()) == []


@pytest.mark.docker
def test_weights_reader_applies_the_model_zip_weights(example_images, example_runner, tmp_path):
    example = get_example("weights-reader")
    dirs = TaskDirs(tmp_path / "task")
    (dirs.input / "batch").mkdir()
    (dirs.input / "batch" / "values.txt").write_text("1 2\n4\n")
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(example.make_model_zip(tmp_path / "model.zip")) as archive:
        archive.extractall(model_dir)

    result = run_example(example_runner, example, dirs, model_dir=model_dir)

    assert result.exit_code == 0, result.logs
    # scale 2.5, offset -1.0
    assert (dirs.output / "batch" / "values.txt").read_text() == "1.5 4\n9\n"
    summary = json.loads((dirs.output / "summary.json").read_text())
    assert summary["files"] == ["batch/values.txt"]
    assert summary["weights"]["scale"] == 2.5


@pytest.mark.docker
def test_weights_reader_without_model_zip_fails_clearly(example_images, example_runner, tmp_path):
    dirs = TaskDirs(tmp_path / "task")
    (dirs.input / "values.txt").write_text("1\n")

    result = run_example(example_runner, get_example("weights-reader"), dirs)

    assert result.exit_code not in (0, None)
    assert "/model/weights.json not found" in result.logs


@pytest.mark.docker
def test_brain_mask_threshold_method_comes_from_the_params(example_images, example_runner, tmp_path):
    volume, affine, _ = synthetic_head()
    thresholds = {}
    for method, params in (
        ("default", None),
        ("mean", {"method": "mean"}),
        ("fixed", {"method": "fixed", "threshold": 60.5}),
    ):
        dirs = TaskDirs(tmp_path / method)
        nib.save(nib.Nifti1Image(volume, affine), dirs.input / "head.nii.gz")
        result = run_example(example_runner, get_example("brain-mask"), dirs, params=params)
        assert result.exit_code == 0, result.logs
        report = json.loads((dirs.output / "report.json").read_text())
        thresholds[method] = report["images"][0]["threshold"]
        expected_method = "otsu" if method == "default" else method
        assert report["method"].startswith(f"{expected_method}+")

    assert thresholds["fixed"] == 60.5
    assert thresholds["mean"] == pytest.approx(float(volume.mean()), rel=1e-4)
    assert thresholds["default"] not in (thresholds["mean"], thresholds["fixed"])


@pytest.mark.docker
def test_brain_mask_fixed_method_without_threshold_fails_clearly(example_images, example_runner, tmp_path):
    dirs = TaskDirs(tmp_path / "task")
    volume, affine, _ = synthetic_head()
    nib.save(nib.Nifti1Image(volume, affine), dirs.input / "head.nii.gz")

    result = run_example(example_runner, get_example("brain-mask"), dirs, params={"method": "fixed"})

    assert result.exit_code == 2
    assert 'method "fixed" needs a numeric "threshold" param' in result.logs
    assert list(dirs.output.iterdir()) == []


def linear_rows(count: int, seed: int) -> str:
    """CSV rows of y = 3 + 2 x1 - 0.5 x2 plus small integer noise: integer data, exact sums."""
    rng = np.random.default_rng(seed)
    lines = ["x1,x2,y"]
    for x1, x2, noise in zip(
        rng.integers(-10, 11, count), rng.integers(-5, 6, count), rng.integers(-1, 2, count), strict=True
    ):
        lines.append(f"{x1},{x2},{3 + 2 * x1 - 0.5 * x2 + noise}")
    return "\n".join(lines) + "\n"


@pytest.mark.docker
def test_linear_model_fine_tuned_equals_trained_on_both(example_images, example_runner, tmp_path):
    train, predict = get_example("linear-train"), get_example("linear-predict")
    first, second = linear_rows(20, seed=1), linear_rows(15, seed=2)

    trained = TaskDirs(tmp_path / "train")
    (trained.input / "first.csv").write_text(first)
    assert run_example(example_runner, train, trained).exit_code == 0
    tuned = TaskDirs(tmp_path / "tune")
    (tuned.input / "second.csv").write_text(second)
    # model_from: the earlier task's output is the fine-tuning task's /model.
    result = run_example(example_runner, train, tuned, model_dir=trained.output)
    assert result.exit_code == 0, result.logs
    both = TaskDirs(tmp_path / "both")
    (both.input / "first.csv").write_text(first)
    (both.input / "second.csv").write_text(second)
    assert run_example(example_runner, train, both).exit_code == 0

    tuned_weights = (tuned.output / "weights.json").read_bytes()
    assert tuned_weights == (both.output / "weights.json").read_bytes()
    weights = json.loads(tuned_weights)
    assert weights["features"] == ["x1", "x2"] and weights["statistics"]["rows"] == 35
    assert weights["coefficients"]["x1"] == pytest.approx(2, abs=0.1)
    assert weights["intercept"] == pytest.approx(3, abs=0.5)
    report = json.loads((tuned.output / "report.json").read_text())
    assert (report["rows_earlier"], report["rows_new"], report["continued_from_model"]) == (20, 15, True)

    queries = TaskDirs(tmp_path / "predict")
    (queries.input / "queries.csv").write_text("x1,x2\n1,2\n0,0\n")
    result = run_example(example_runner, predict, queries, model_dir=tuned.output)
    assert result.exit_code == 0, result.logs
    lines = (queries.output / "queries.csv").read_text().splitlines()
    assert lines[0] == "x1,x2,prediction"
    expected = weights["intercept"] + weights["coefficients"]["x1"] * 1 + weights["coefficients"]["x2"] * 2
    assert float(lines[1].split(",")[2]) == pytest.approx(expected, rel=1e-12)
    assert float(lines[2].split(",")[2]) == pytest.approx(weights["intercept"], rel=1e-12)


@pytest.mark.docker
def test_linear_model_params_and_missing_weights(example_images, example_runner, tmp_path):
    train, predict = get_example("linear-train"), get_example("linear-predict")
    rows = linear_rows(20, seed=3)
    coefficients = {}
    for name, params in (("plain", None), ("ridge", {"l2": 1000})):
        dirs = TaskDirs(tmp_path / name)
        (dirs.input / "data.csv").write_text(rows)
        result = run_example(example_runner, train, dirs, params=params)
        assert result.exit_code == 0, result.logs
        coefficients[name] = json.loads((dirs.output / "weights.json").read_text())["coefficients"]["x1"]
    # A heavy ridge penalty pulls the coefficient towards 0.
    assert abs(coefficients["ridge"]) < abs(coefficients["plain"]) / 2

    dirs = TaskDirs(tmp_path / "no-weights")
    (dirs.input / "queries.csv").write_text("x1,x2\n1,2\n")
    result = run_example(example_runner, predict, dirs)
    assert result.exit_code == 1
    assert "weights.json not found: submit with model_from" in result.logs
