"""Foreground (brain) mask for every NIfTI image under /input.

For each image: threshold the intensities (Otsu's by default), keep the largest connected
component, fill the holes inside it. Writes <name>_mask.nii.gz next to where the image sat (same
sub-folder, under /output) and one /output/report.json with counts and volumes.

Params (/params.json, absent when the task has none; params_schema.json declares them):
{"method": "otsu" | "mean" | "fixed", "threshold": number}; "fixed" takes its threshold from
"threshold", the others ignore it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

INPUT = Path(os.environ.get("MODEL_INPUT_DIR", "/input"))
OUTPUT = Path(os.environ.get("MODEL_OUTPUT_DIR", "/output"))
PARAMS = Path(os.environ.get("MODEL_PARAMS_FILE", "/params.json"))
METHODS = ("otsu", "mean", "fixed")
SUFFIXES = (".nii.gz", ".nii")


def nifti_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))


def stem_of(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of the intensity histogram."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_below = np.cumsum(counts)
    weight_above = weight_below[-1] - weight_below
    sum_below = np.cumsum(counts * centres)
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    # The threshold sits at the upper edge of the bin that ends the "below" class.
    return float(edges[int(np.argmax(between)) + 1])


class Thresholding:
    """How the foreground is told from the background, from the task's params."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.method = str(params.get("method", "otsu"))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        self.fixed: float | None = None
        if self.method == "fixed":
            if not isinstance(params.get("threshold"), int | float):
                raise ValueError('method "fixed" needs a numeric "threshold" param')
            self.fixed = float(params["threshold"])

    def threshold(self, values: np.ndarray) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.method == "mean":
            return float(values.mean())
        return otsu_threshold(values)


def read_params() -> dict[str, Any]:
    if not PARAMS.is_file():
        return {}
    params = json.loads(PARAMS.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{PARAMS} is not a JSON object")
    return params


def brain_mask(volume: np.ndarray, thresholding: Thresholding) -> tuple[np.ndarray, float]:
    finite = np.isfinite(volume)
    values = volume[finite]
    if values.size == 0:
        raise ValueError("image holds no finite voxel values")
    threshold = thresholding.threshold(values)
    mask = finite & (volume > threshold)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask)
    return mask, threshold


def process(path: Path, thresholding: Thresholding) -> dict[str, Any]:
    image = nib.load(str(path))
    if not isinstance(image, nib.Nifti1Image):  # NIfTI-2 images are NIfTI-1 images too
        raise ValueError(f"not a NIfTI image: nibabel read it as {type(image).__name__}")
    data = np.asanyarray(image.dataobj).astype(np.float32, copy=False)
    if data.ndim == 4:
        # A time series or multi-echo file: the mask of the mean image covers every volume.
        data = data.mean(axis=3)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D (or 4D) image, got {data.ndim} dimensions {data.shape}")
    mask, threshold = brain_mask(data, thresholding)

    relative = path.relative_to(INPUT)
    out_path = OUTPUT / relative.parent / f"{stem_of(path)}_mask.nii.gz"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    mask_image = type(image)(mask.astype(np.uint8), image.affine, header)
    mask_image.header.set_slope_inter(1, 0)
    nib.save(mask_image, str(out_path))

    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    voxel_mm3 = float(np.prod(zooms))
    in_mask = int(mask.sum())
    return {
        "input": relative.as_posix(),
        "mask": out_path.relative_to(OUTPUT).as_posix(),
        "shape": [int(n) for n in data.shape],
        "voxel_size_mm": zooms,
        "threshold": threshold,
        "voxels_total": int(mask.size),
        "voxels_in_mask": in_mask,
        "mask_fraction": in_mask / mask.size,
        "mask_volume_ml": in_mask * voxel_mm3 / 1000.0,
    }


def main() -> int:
    if not INPUT.is_dir():
        print(f"brain_mask: {INPUT} does not exist; run this image under the job consumer", file=sys.stderr)
        return 2
    try:
        thresholding = Thresholding(read_params())
    except ValueError as exc:
        print(f"brain_mask: params: {exc}", file=sys.stderr)
        return 2
    files = nifti_files(INPUT)
    if not files:
        print(f"brain_mask: no NIfTI files (*.nii, *.nii.gz) found under {INPUT}", file=sys.stderr)
        return 2
    results, errors = [], []
    for path in files:
        relative = path.relative_to(INPUT).as_posix()
        try:
            entry = process(path, thresholding)
        except Exception as exc:  # one unreadable file must not hide the others' results
            print(f"brain_mask: {relative}: {type(exc).__name__}: {exc}", file=sys.stderr)
            errors.append({"input": relative, "error": f"{type(exc).__name__}: {exc}"})
            continue
        print(
            f"{relative}: threshold {entry['threshold']:.4g}, {entry['voxels_in_mask']} voxels,"
            f" {entry['mask_volume_ml']:.1f} ml -> {entry['mask']}"
        )
        results.append(entry)
    method = f"{thresholding.method}+largest-component+fill-holes"
    report: dict[str, Any] = {"model": "brain_mask", "method": method, "images": results}
    if errors:
        report["errors"] = errors
    (OUTPUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if errors:
        print(f"brain_mask: {len(errors)} of {len(files)} image(s) failed", file=sys.stderr)
        return 1
    print(f"brain_mask: {len(results)} mask(s) written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
