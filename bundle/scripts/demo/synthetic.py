"""Synthetic few-shot datasets for the demo and the tests, deterministic by seed.

``python -m scripts.demo.synthetic --output_dir data/synthetic`` (from ``bundle/``) writes
Decathlon-style datasets, each with ``dataset.json``: 16 training, 4 validation and 4 labelled
test cases (the held-out images evaluation scores):

- ``microscopy/``: 16-bit TIFF fields of textured, noisy cells; masks as uint8 TIFF (0/1);
- ``ct/``: CT-like NIfTI volumes in HU with an organ-like structure (label 1), the first
  test case also as a DICOM series (``dicom/``), listed under ``test`` without a label;
- ``endoscopy/``: JPEG frames with a polyp-like region; masks as PNG with values 0/255
  (map them with ``label_map: {255: 1}``);
- ``cells_rods/``: two classes in 16-bit TIFF fields, round cells (label 1) and thin rod-shaped
  particles (label 2): ``num_classes: 2``, ``classes: [1, 2]``;
- ``shapes/``: PNG scenes of ellipses, rectangles and triangles whose colours, textures and sizes
  come from the same ranges: only the shape tells the ellipses (label 1) from the others, a
  purely kind-selective task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from .noise import smooth_noise

MODALITIES = ("microscopy", "ct", "endoscopy", "cells_rods", "shapes")


def _ellipse(shape: tuple[int, int], center, radii, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    y, x = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return ((c * x + s * y) / radii[1]) ** 2 + ((-s * x + c * y) / radii[0]) ** 2 <= 1.0


def microscopy_case(rng: np.random.Generator, shape=(260, 300)) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 field of 6-14 textured cells on a dim, uneven background."""
    mask = np.zeros(shape, np.uint8)
    signal = np.zeros(shape)
    for _ in range(rng.integers(6, 15)):
        radii = rng.uniform(9, 22, 2)
        center = rng.uniform(radii.max(), np.array(shape) - radii.max())
        cell = _ellipse(shape, center, radii, rng.uniform(0, np.pi))
        cell &= mask == 0
        mask[cell] = 1
        signal[cell] = rng.uniform(0.5, 1.0)
    texture = 1 + 0.25 * smooth_noise(rng, shape, 2.0)
    background = 900 + 250 * smooth_noise(rng, shape, 40.0)
    image = background + 5000 * ndimage.gaussian_filter(signal * texture, 1.2)
    image = rng.poisson(np.clip(image, 1, None)).astype(np.float64) + rng.normal(0, 40, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), mask


def _rod(shape: tuple[int, int], center, length: float, width: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    y, x = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return (np.abs(c * x + s * y) <= length / 2) & (np.abs(-s * x + c * y) <= width / 2)


def cells_rods_case(rng: np.random.Generator, shape=(260, 300)) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 field of 4-8 round cells (label 1) and 4-8 thin, dimmer rods (label 2), none touching."""
    label = np.zeros(shape, np.uint8)
    signal = np.zeros(shape)
    kinds = [1] * int(rng.integers(4, 9)) + [2] * int(rng.integers(4, 9))
    for kind in rng.permutation(kinds):
        for _ in range(20):  # a free place, or give up on this object
            if kind == 1:
                radii = rng.uniform(10, 20, 2)
                center = rng.uniform(radii.max(), np.array(shape) - radii.max())
                region = _ellipse(shape, center, radii, rng.uniform(0, np.pi))
            else:
                length, width = rng.uniform(40, 60), rng.uniform(8, 11)
                center = rng.uniform(length / 2, np.array(shape) - length / 2)
                region = _rod(shape, center, length, width, rng.uniform(0, np.pi))
            if not (ndimage.binary_dilation(region, iterations=3) & (label > 0)).any():
                label[region] = kind
                signal[region] = rng.uniform(0.6, 1.0) if kind == 1 else rng.uniform(0.25, 0.4)  # rods stain dimmer
                break
    texture = 1 + 0.25 * smooth_noise(rng, shape, 2.0)
    background = 900 + 250 * smooth_noise(rng, shape, 40.0)
    image = background + 5000 * ndimage.gaussian_filter(signal * texture, 1.2)
    image = rng.poisson(np.clip(image, 1, None)).astype(np.float64) + rng.normal(0, 40, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), label


def _triangle(shape: tuple[int, int], center, radius: float, angle: float) -> np.ndarray:
    """An equilateral triangle: three half-planes at ``radius / 2`` from the centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    inside = np.ones(shape, bool)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        inside &= np.cos(a) * (xx - center[1]) + np.sin(a) * (yy - center[0]) <= radius / 2
    return inside


def shapes_scene(rng: np.random.Generator, shape=(256, 256)) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """An RGB uint8 scene of 1-3 ellipses and 3-6 rectangles or triangles, none touching, on a
    textured background; with each object's region and kind. Every kind draws its colour,
    texture and size from the same ranges, so that only the shape tells the kinds apart. About
    30 % of the objects are ellipses: marking every object scores a Dice of about 0.5."""
    occupied = np.zeros(shape, bool)
    rgb = rng.uniform(40, 140, 3) + 18 * smooth_noise(rng, shape, rng.uniform(3, 12))[..., None]
    regions, placed = [], []
    kinds = ["ellipse"] * int(rng.integers(1, 4)) + list(rng.choice(["rectangle", "triangle"], int(rng.integers(3, 7))))
    for kind in rng.permutation(kinds):
        for _ in range(20):  # a free place, or give up on this object
            size, angle = rng.uniform(16, 36), rng.uniform(0, np.pi)
            center = rng.uniform(size, np.array(shape) - size)
            if kind == "ellipse":
                region = _ellipse(shape, center, (size * rng.uniform(0.6, 1.0), size), angle)
            elif kind == "rectangle":
                region = _rod(shape, center, 1.7 * size, 1.7 * size * rng.uniform(0.6, 1.0), angle)
            else:
                region = _triangle(shape, center, 1.4 * size, angle)  # about the others' area
            if not (ndimage.binary_dilation(region, iterations=3) & occupied).any():
                occupied |= region
                fill = rng.uniform(60, 255, 3) + 15 * smooth_noise(rng, shape, rng.uniform(1, 4))[..., None]
                rgb[region] = fill[region]
                regions.append(region)
                placed.append(str(kind))
                break
    rgb += rng.normal(0, 4, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), regions, placed


def shapes_case(rng: np.random.Generator, shape=(256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """A scene of ``shapes_scene`` and its mask of the ellipses (label 1)."""
    rgb, regions, kinds = shapes_scene(rng, shape)
    label = np.zeros(shape, np.uint8)
    for region, kind in zip(regions, kinds, strict=True):
        label[region] = kind == "ellipse"
    return rgb, label


def ct_case(rng: np.random.Generator, shape=(96, 80, 24)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume (x, y, z): air, a body ellipse of soft tissue with a bony rim, and an
    organ-like lobe slightly brighter than its surroundings (label 1) in the middle slices."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.42 * shape[1])) ** 2 <= 1
    rim = body & (((x - cx) / (0.40 * shape[0])) ** 2 + ((y - cy) / (0.37 * shape[1])) ** 2 > 1)
    ox, oy, oz = cx + rng.uniform(-12, 0), cy + rng.uniform(-8, 8), shape[2] / 2 + rng.uniform(-2, 2)
    rx, ry, rz = rng.uniform(12, 18), rng.uniform(9, 14), rng.uniform(5, 8)
    wobble = 0.15 * smooth_noise(rng, shape, 4.0)
    organ = body & ((((x - ox) / rx) ** 2 + ((y - oy) / ry) ** 2 + ((z - oz) / rz) ** 2) <= 1 + wobble)
    hu = np.full(shape, -1000.0)
    hu[body] = 30 + 15 * smooth_noise(rng, shape, 3.0)[body]
    hu[rim] = 700
    hu[organ] = 110 + 10 * smooth_noise(rng, shape, 2.0)[organ]
    hu += rng.normal(0, 12, shape)
    return np.clip(hu, -1024, 3071).astype(np.int16), organ.astype(np.uint8)


CT_SPACING = (0.8, 0.8, 2.5)


def ct_affine(rng: np.random.Generator) -> np.ndarray:
    affine = np.diag([*CT_SPACING, 1.0])
    affine[:3, 3] = rng.uniform(-120, -60, 3)
    return affine


def endoscopy_case(rng: np.random.Generator, shape=(240, 288)) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 frame of pink mucosa with a redder, bumpy polyp-like region (mask 0/255)."""
    radii = rng.uniform(25, 55, 2)
    center = rng.uniform(radii.max() + 5, np.array(shape) - radii.max() - 5)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    bumps = 0.2 * smooth_noise(rng, shape, 6.0)
    dist = ((xx - center[1]) / radii[1]) ** 2 + ((yy - center[0]) / radii[0]) ** 2
    polyp = dist <= 1 + bumps
    tissue = smooth_noise(rng, shape, 8.0)
    vignette = 1 - 0.5 * (((yy - shape[0] / 2) / shape[0]) ** 2 + ((xx - shape[1] / 2) / shape[1]) ** 2) * 2
    rgb = np.stack([200 + 15 * tissue, 120 + 12 * tissue, 115 + 10 * tissue], axis=-1)
    rgb[polyp] = np.stack([175 + 10 * tissue, 70 + 10 * tissue, 70 + 8 * tissue], axis=-1)[polyp]
    shade = 1 + 0.25 * np.clip(1 - dist, 0, 1)[..., None] * polyp[..., None]
    rgb = rgb * vignette[..., None] * shade + rng.normal(0, 4, (*shape, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), (polyp * 255).astype(np.uint8)


def write_dicom_series(
    volume: np.ndarray, affine: np.ndarray, folder: Path, seed: int, patient_id: str = "SYNTHETIC"
) -> None:
    """Write an (x, y, z) HU volume as a CT DICOM series in the geometry of its RAS ``affine``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.transpose(volume, (2, 1, 0)).astype(np.int16))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = f"1.2.826.0.1.3680043.8.498.{seed + 1}.{volume.shape[2]}"
    direction = image.GetDirection()
    for k in range(volume.shape[2]):
        plane = image[:, :, k]
        for tag, value in (
            ("0008|0060", "CT"),
            ("0010|0010", "SYNTHETIC^CT"),
            ("0010|0020", patient_id),
            ("0020|0052", series_uid + ".2"),  # FrameOfReferenceUID
            ("0020|000d", series_uid + ".1"),
            ("0020|000e", series_uid),
            ("0020|0013", str(k + 1)),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))),
            ("0018|0050", f"{spacing[2]:.6f}"),
            ("0028|1052", "0"),
            ("0028|1053", "1"),
        ):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(plane)


def _save(kind: str, array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tiff":
        import tifffile

        tifffile.imwrite(path, array, compression="zlib")
    elif kind == "nifti":
        import nibabel as nib

        nib.save(nib.Nifti1Image(array, affine), str(path))
    else:
        from PIL import Image

        Image.fromarray(array).save(path, quality=92) if kind == "jpeg" else Image.fromarray(array).save(path)


MODALITY_NAMES = {
    "microscopy": "fluorescence microscopy",
    "ct": "CT",
    "endoscopy": "endoscopy",
    "cells_rods": "fluorescence microscopy",
    "shapes": "synthetic scenes",
}
LABELS = {
    "microscopy": {"0": "background", "1": "cell"},
    "ct": {"0": "background", "1": "organ"},
    "endoscopy": {"0": "background", "1": "polyp"},
    "cells_rods": {"0": "background", "1": "cell", "2": "rod"},
    "shapes": {"0": "background", "1": "ellipse"},
}


def generate(
    output_dir: str = "data/synthetic",
    seed: int = 0,
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 4,
    modalities: str | tuple[str, ...] = MODALITIES,
) -> dict[str, str]:
    """Write the datasets; returns {modality: path of its dataset.json}."""
    if isinstance(modalities, str):
        modalities = tuple(m.strip() for m in modalities.split(","))
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
    written = {}
    for offset, modality in enumerate(MODALITIES):
        if modality not in modalities:
            continue
        rng = np.random.default_rng([seed, offset])
        root = Path(output_dir) / modality
        entries = []
        for i in range(n_train + n_val + n_test):
            if modality == "microscopy":
                image, label = microscopy_case(rng)
                names, kinds, affine = (f"cells_{i:03d}.tif", f"cells_{i:03d}.tif"), ("tiff", "tiff"), None
            elif modality == "cells_rods":
                image, label = cells_rods_case(rng)
                names, kinds, affine = (f"field_{i:03d}.tif", f"field_{i:03d}.tif"), ("tiff", "tiff"), None
            elif modality == "shapes":
                image, label = shapes_case(rng)
                names, kinds, affine = (f"scene_{i:03d}.png", f"scene_{i:03d}.png"), ("png", "png"), None
            elif modality == "ct":
                image, label = ct_case(rng)
                affine = ct_affine(rng)
                names, kinds = (f"ct_{i:03d}.nii.gz", f"ct_{i:03d}.nii.gz"), ("nifti", "nifti")
            else:
                image, label = endoscopy_case(rng)
                names, kinds, affine = (f"polyp_{i:03d}.jpg", f"polyp_{i:03d}.png"), ("jpeg", "png"), None
            _save(kinds[0], image, root / "imagesTr" / names[0], affine)
            _save(kinds[1], label, root / "labelsTr" / names[1], affine)
            entries.append({"image": f"imagesTr/{names[0]}", "label": f"labelsTr/{names[1]}"})
            if modality == "ct" and n_test and i == n_train + n_val:
                write_dicom_series(image, affine, root / "dicom" / f"ct_{i:03d}", seed)
        test: list = entries[n_train + n_val :]
        if modality == "ct" and n_test:
            test = [f"dicom/ct_{n_train + n_val:03d}", *test]  # an image to predict: no label of its own
        description = {
            "name": f"synthetic-{modality}",
            "description": f"Synthetic {modality} few-shot dataset (seed {seed}) for the PTSAM bundle's demo and tests",
            "modality": MODALITY_NAMES[modality],
            "labels": LABELS[modality],
            "numTraining": n_train,
            "training": entries[:n_train],
            "validation": entries[n_train : n_train + n_val],
            "test": test,
        }
        (root / "dataset.json").write_text(json.dumps(description, indent=2))
        written[modality] = str(root / "dataset.json")
    return written


if __name__ == "__main__":
    import fire

    fire.Fire(generate)
