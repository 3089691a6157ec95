"""From the network's logits (on the input's grid) to label files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, apply_transform
from scipy import ndimage

from ..common.flags import flag
from .io import write_label
from .io.dicom_seg import write_dicom_seg
from .io.formats import COLUMNS_FIRST
from .io.geojson import label_features, write_geojson
from .io.writers import OUTPUT_POSTFIX, output_path
from .meta import meta_int, meta_of


def logits_to_label(logits: torch.Tensor) -> torch.Tensor:
    """(C, ...) logits -> (1, ...) label: class c + 1 where its logit is highest and positive
    (probability above one half; every class is its own sigmoid), background elsewhere."""
    best, index = torch.as_tensor(logits).max(dim=0, keepdim=True)
    return torch.where(best > 0, index + 1, 0).to(torch.float32)


def voxel_spacing(meta: Mapping, ndim: int) -> tuple[float, ...] | None:
    """How long a voxel is along each of the first ``ndim`` array axes: the lengths of the
    affine's columns (mm for NIfTI and DICOM; 1 for formats without geometry, whose affine is
    the identity). None without a usable affine."""
    if meta.get("affine") is None:
        return None
    affine = np.asarray(torch.as_tensor(meta["affine"]).reshape(4, 4).cpu(), dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :ndim], axis=0)
    if len(spacing) != ndim or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return None
    return tuple(float(s) for s in spacing)


def instance_labels(
    label: np.ndarray,
    split_touching: bool = False,
    min_depth: float = 2.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Number every connected object of every class 1, 2, 3, ... (classes one after another).

    With ``split_touching``, touching objects are split by a watershed on the distance to the
    background, seeded at its maxima that rise at least ``min_depth`` above the neck joining
    them to another (so a waist narrower than the objects by that much separates them).
    Distances are physical where ``spacing`` (each axis's voxel size, ``voxel_spacing``) is
    given: a CT of 0.7 x 0.7 x 5 mm voxels is split as the objects are in the body, not as
    they are in voxels. They are counted in voxels of the finest axis, as is ``min_depth``:
    on a grid of equal spacing the result is that of no spacing at all.
    """
    sampling = None
    if spacing is not None:
        sampling = np.asarray(spacing, dtype=np.float64)
        sampling = sampling / sampling.min()
    out = np.zeros(label.shape, np.int32)
    next_id = 1
    for cls in (c for c in np.unique(label) if c > 0):
        mask = label == cls
        if split_touching:
            from skimage.morphology import h_maxima
            from skimage.segmentation import watershed

            distance = ndimage.distance_transform_edt(mask, sampling=sampling)
            markers, _ = ndimage.label(h_maxima(distance, min_depth))  # a plateau is one seed
            regions = watershed(-distance, markers, mask=mask)
        else:
            regions, _ = ndimage.label(mask)
        ids = np.unique(regions[regions > 0])
        remap = np.zeros(int(regions.max()) + 1, np.int32)
        remap[ids] = np.arange(next_id, next_id + len(ids))
        out[mask] = remap[regions[mask]]
        next_id += len(ids)
    return out


class LogitsToLabeld(MapTransform):
    """Logits -> label map, see ``logits_to_label``."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = logits_to_label(d[key])
        return d


class InstanceLabelsd(MapTransform):
    """Label map -> instance labels (cells and particles counted one by one), see ``instance_labels``;
    touching objects are split in physical space, by the voxel spacing of ``ref_key``'s affine."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        enabled: bool = True,
        split_touching: bool = False,
        min_depth: float = 2.0,
        ref_key: str = "image",
        **kw,
    ):
        super().__init__(keys, kw.pop("allow_missing_keys", False))
        self.enabled, self.split_touching, self.min_depth = flag(enabled), flag(split_touching), min_depth
        self.ref_key = ref_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            label = _label_array(d[key])
            spacing = voxel_spacing(meta_of(d, self.ref_key), label.ndim) if self.ref_key in d else None
            instances = instance_labels(label, self.split_touching, self.min_depth, spacing)
            d[key] = torch.from_numpy(instances[None].astype(np.float32))
        return d


class _OutputNames:
    """Output paths unique within a run: two inputs of one name (``a/x.png``, ``b/x.png``, or a
    DICOM folder ``ct_1`` beside ``ct_1.nii.gz``) get ``x_seg.png`` and ``x_seg_2.png``."""

    def __init__(self, output_dir: str | Path, postfix: str, extension: str | None = None):
        self.output_dir, self.postfix, self.extension = output_dir, postfix, extension
        self.written: dict[Path, str] = {}  # output -> the input it was written for, in this run

    def __call__(self, meta: Mapping) -> Path:
        path = output_path(meta, self.output_dir, self.postfix)
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        if self.extension is not None:
            path, suffix = path.with_name(path.name[: -len(suffix)] + self.extension), self.extension
        source, candidate, n = str(meta["filename_or_obj"]), path, 1
        while self.written.get(candidate, source) != source:
            n += 1
            candidate = path.with_name(f"{path.name[: -len(suffix)]}_{n}{suffix}")
        self.written[candidate] = source
        return candidate


def _reference_meta(d: Mapping, ref_key: str) -> dict:
    meta = dict(meta_of(d, ref_key))
    meta["affine"] = np.asarray(torch.as_tensor(meta["affine"]).reshape(4, 4).cpu(), dtype=np.float64)
    meta["spatial_shape"] = tuple(meta_int(s) for s in meta["spatial_shape"])
    return meta


def _label_array(value: Any) -> np.ndarray:
    return torch.as_tensor(value)[0].round().to(torch.int64).cpu().numpy()


class WriteLabeld(MapTransform):
    """Write each (1, *spatial) label in its input's format and geometry (``scripts.data.io.writers``);
    the written path goes to ``<key>_path``; names stay unique within a run (``_OutputNames``)."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        ref_key: str = "image",
        output_dir: str = ".",
        postfix: str = OUTPUT_POSTFIX,
        **kw,
    ):
        super().__init__(keys, kw.pop("allow_missing_keys", False))
        self.ref_key, self.output_dir, self.postfix = ref_key, output_dir, postfix
        self.names = _OutputNames(output_dir, postfix)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = _reference_meta(d, self.ref_key)
        for key in self.key_iterator(d):
            label = _label_array(d[key])
            path = self.names(meta)
            d[f"{key}_path"] = str(write_label(label, meta, self.output_dir, self.postfix, path=path))
        return d


class _WriteBeside(MapTransform):
    """Beside the label, one more file per image, made from its class label map by ``write``;
    its path goes to ``<key>_<kind>_path``. Off unless ``enabled``."""

    kind, extension = "", ""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        ref_key: str = "image",
        output_dir: str = ".",
        class_names: Sequence[str] = ("foreground",),
        enabled: bool = True,
        postfix: str = OUTPUT_POSTFIX,
        **kw,
    ):
        super().__init__(keys, kw.pop("allow_missing_keys", False))
        self.ref_key, self.class_names, self.enabled = ref_key, list(class_names), flag(enabled)
        self.names = _OutputNames(output_dir, postfix, self.extension)

    def write(self, classes: np.ndarray, meta: Mapping, path: Path) -> Path:
        raise NotImplementedError

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        meta = _reference_meta(d, self.ref_key)
        for key in self.key_iterator(d):
            d[f"{key}_{self.kind}_path"] = str(self.write(_label_array(d[key]), meta, self.names(meta)))
        return d


class WriteGeoJSONd(_WriteBeside):
    """Beside the label, ``<name>_seg.geojson``: each object of a 2D class label map as a polygon
    classified by its class name, for QuPath (``scripts.data.io.geojson``), in the image's pixel
    coordinates (x the column, y the row, for DICOM and NIfTI too); the path goes to
    ``<key>_geojson_path``. Objects are connected components, split where touching if asked (as
    ``InstanceLabelsd``). A volume is refused, naming the file: polygons are for 2D images."""

    kind, extension = "geojson", ".geojson"

    def __init__(self, keys: KeysCollection = "pred", split_touching: bool = False, **kw):
        super().__init__(keys, **kw)
        self.split_touching = flag(split_touching)

    def write(self, classes: np.ndarray, meta: Mapping, path: Path) -> Path:
        spacing = voxel_spacing(meta, classes.ndim)
        if meta["format"] in COLUMNS_FIRST and classes.ndim == 2:  # (x, y) -> rows, columns
            classes, spacing = classes.T, None if spacing is None else spacing[::-1]
        objects = instance_labels(classes, self.split_touching, spacing=spacing)
        return write_geojson(label_features(classes, objects, self.class_names, str(meta["filename_or_obj"])), path)


class WriteDicomSegd(_WriteBeside):
    """Beside the label of a DICOM series, ``<name>_seg.dcm``: a DICOM Segmentation object of
    its class label map, segments named by ``class_names`` (``scripts.data.io.dicom_seg``); the
    path goes to ``<key>_dicom_seg_path``. Another format is refused, naming the file."""

    kind, extension = "dicom_seg", ".dcm"

    def __init__(self, keys: KeysCollection = "pred", version: str = "0", **kw):
        super().__init__(keys, **kw)
        self.version = str(version)

    def write(self, classes: np.ndarray, meta: Mapping, path: Path) -> Path:
        source = str(meta["filename_or_obj"])
        if meta["format"] != "dicom":
            raise ValueError(f"{source}: a DICOM SEG is made for DICOM inputs, not {meta['format']}")
        return write_dicom_seg(classes, source, self.class_names, path, version=self.version)


class AllOrNothing(Compose):
    """``Compose`` of the transforms that make and write one input's outputs: if one of them
    fails, the files the earlier ones wrote (their ``*_path`` entries) are removed before the
    error goes on, so an input that failed leaves no partial outputs behind. (MONAI Label runs
    the transforms one by one, as with any ``Compose``.)"""

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        data = input_
        try:
            for transform in self.transforms[start:end]:
                data = apply_transform(transform, data, self.map_items, self.unpack_items, log_stats=self.log_stats)
        except Exception:
            _remove_written(data, input_)
            raise
        return data


def _remove_written(data: Any, before: Any) -> None:
    if not isinstance(data, Mapping) or not isinstance(before, Mapping):
        return
    for key, value in data.items():
        if key.endswith("_path") and key not in before and isinstance(value, str):
            Path(value).unlink(missing_ok=True)
