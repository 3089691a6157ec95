"""Dictionary transforms from files to SAM's input and back, composed by the bundle configs.

Order in the configs: ``LoadImageAnyd`` -> (inference: ``CheckImageKindd``) -> ``LabelClassesd``
-> ``SamIntensityd`` -> ``SamChannelsd`` -> (training on volumes: ``SampleSlicesd``) -> ``SamInputd``;
after the network: ``InvertSamInputd``, then ``scripts.data.postprocess`` (labels, instances, writing).

A volume is a stack of 2D slices along ``slice_axis`` (a spatial axis; by default the file's
axial axis: the one most aligned with the body's long axis for NIfTI/DICOM, Z for TIFF
stacks). ``SamInputd`` turns a 2D image (C, H, W) into (3, S, S) and a volume into a stack
(3, n, S, S); ``InvertSamInputd`` maps the network's output back onto the input's grid.

Layout: NIfTI and DICOM arrays are read (x, y), columns first, PNG, JPEG and TIFF arrays
(rows, columns) (``scripts.data.io.formats.COLUMNS_FIRST``). With ``layout="display"`` (the
default) ``SamInputd`` swaps the in-plane axes of the former, so the network sees every image,
and every slice of a volume, as viewers show it (rows = y), whatever its format;
``InvertSamInputd`` swaps them back. ``layout="stored"`` feeds arrays as read (prompts trained
before the knob existed saw that).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from ..common.flags import flag
from ..model.sam import PIXEL_MEAN, PIXEL_STD
from .io import read_image
from .io.formats import COLUMNS_FIRST
from .kinds import ImageKindError, check_kind, kind_mismatch, kind_of_shape, kind_problem
from .labels import LabelValueError, class_masks, class_of_values, describe_bad_labels
from .meta import meta_int, meta_of, meta_pair
from .pairs import label_on_image_grid

logger = logging.getLogger(__name__)

_MAX_QUANTILE_SAMPLES = 1 << 22
LAYOUTS = ("display", "stored")  # what SamInputd shows the network: see the module's docstring


class LoadImageAnyd(MapTransform):
    """Read NIfTI, DICOM (file, folder, ``folder::SeriesInstanceUID``), TIFF, PNG or JPEG into a
    float32 channel-first ``MetaTensor`` with the file's metadata (see ``scripts.data.io.readers``).
    Keys read together with ``image_key`` (labels) are put on its voxel grid, or refused
    (``scripts.data.pairs``); the keys in ``label_keys`` hold label maps, whose stored values are
    kept (a palette PNG's indices). Each key's ``columns_first`` tells ``SamInputd`` whether its
    array is (x, y): a label put on its image's grid is laid out as that image, whatever its own
    format."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        label_keys: KeysCollection = ("label",),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        loaded = {key: read_image(d[key], as_label=key in self.label_keys) for key in self.key_iterator(d)}
        for key, (array, meta) in loaded.items():
            grid = meta
            if key != self.image_key and self.image_key in loaded:
                grid = loaded[self.image_key][1]
                array, meta = label_on_image_grid(array, meta, grid)
            meta = dict(meta)  # the image's stays whole for the labels after it
            meta["columns_first"] = grid["format"] in COLUMNS_FIRST
            affine = torch.as_tensor(meta.pop("affine"))
            meta["axial_axis"] = -1 if meta["axial_axis"] is None else meta["axial_axis"]
            d[key] = MetaTensor(torch.from_numpy(array.astype(np.float32)), affine=affine, meta=meta)
        return d


class CheckImageKindd(MapTransform):
    """Refuse an image of another kind (2D image, 3D volume) than the prompts were trained on
    (``scripts.data.kinds``), once loaded and before its preprocessing and inference: inference's
    screening refuses such files by their headers first; this catches them wherever
    ``inference.yaml``'s preprocessing runs on its own (MONAI Label). With ``allow_other_kind``
    the image passes, with a warning naming it."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        trained_kind: str | None = None,
        allow_other_kind: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.trained_kind = check_kind(trained_kind, "CheckImageKindd")
        self.allow = flag(allow_other_kind)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            name = meta_of(d, key).get("filename_or_obj", key)
            kind = kind_of_shape(d[key].shape[1:])
            if not self.allow and (problem := kind_problem(name, kind, self.trained_kind)):
                raise ImageKindError(problem)
            if mismatch := kind_mismatch(name, kind, self.trained_kind):
                logger.warning("%s; segmented anyway (allow_other_kind true)", mismatch)
        return d


class LabelClassesd(MapTransform):
    """Turn the declared label values into classes 1..C; refuse any other value
    (see ``class_of_values``). A label saved with identical channels (RGB masks) is reduced to one."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        classes: Sequence[int] = (1,),
        label_map: Mapping[int, int] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.classes, self.label_map = [int(c) for c in classes], label_map

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            name = meta_of(d, key).get("filename_or_obj", key)
            if label.shape[0] > 1:
                if not bool((label == label[:1]).all()):
                    raise LabelValueError(f"{name}: label has {label.shape[0]} differing channels, not one label map")
                label = label[:1]
            found, bad = class_of_values(torch.unique(label).tolist(), self.classes, self.label_map)
            if bad:
                raise LabelValueError(f"{name}: {describe_bad_labels(bad, self.classes)}")
            out = torch.zeros_like(label)
            for value, index in found.items():
                if index:
                    out[label == value] = index
            d[key] = out
        return d


class ClassMasksd(MapTransform):
    """Label maps -> one binary channel per class, what the metrics compare."""

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = class_masks(torch.as_tensor(d[key]), self.num_classes)
        return d


def _quantiles(x: torch.Tensor, lower: float, upper: float) -> tuple[float, float]:
    flat = x.reshape(-1)
    if flat.numel() > _MAX_QUANTILE_SAMPLES:  # an even subsample: deterministic and cheap
        flat = flat[:: flat.numel() // _MAX_QUANTILE_SAMPLES + 1]
    lo, hi = np.percentile(flat.numpy(), [lower, upper])
    return float(lo), float(hi)


class SamIntensityd(MapTransform):
    """Map intensities to SAM's 0..255 range, per channel.

    ``mode``: ``window`` (CT: ``a_min``..``a_max`` HU, soft tissue by default), ``percentile``
    (microscopy, MR: ``lower``..``upper`` percentiles of the whole image or volume),
    ``none`` (already 0..255), or ``auto``: ``none`` for 8-bit files, ``percentile`` otherwise.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mode: str = "auto",
        a_min: float = -160.0,
        a_max: float = 240.0,
        lower: float = 1.0,
        upper: float = 99.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if mode not in ("auto", "window", "percentile", "none"):
            raise ValueError(f"intensity mode must be auto, window, percentile or none, got {mode!r}")
        if a_max <= a_min or not 0 <= lower < upper <= 100:
            raise ValueError(f"need a_min < a_max and 0 <= lower < upper <= 100: {a_min}, {a_max}, {lower}, {upper}")
        self.mode, self.a_min, self.a_max, self.lower, self.upper = mode, a_min, a_max, lower, upper

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            mode = self.mode
            if mode == "auto":
                mode = "none" if meta_of(d, key).get("source_dtype") == "uint8" else "percentile"
            if mode == "window":
                lows, highs = [self.a_min] * x.shape[0], [self.a_max] * x.shape[0]
            elif mode == "percentile":
                lows, highs = zip(*(_quantiles(c, self.lower, self.upper) for c in x), strict=True)
            else:
                lows, highs = [0.0] * x.shape[0], [255.0] * x.shape[0]
            channels = []
            for c, lo, hi in zip(x, lows, highs, strict=True):
                scaled = (c - lo) * (255.0 / (hi - lo)) if hi > lo else torch.zeros_like(c)
                channels.append(scaled.clamp(0.0, 255.0))
            d[key] = torch.stack(channels)
        return d


def channel_problem(n_channels: int, channels: Sequence[int] | None = None) -> str | None:
    """Why ``SamChannelsd`` refuses an image of ``n_channels`` (None if it does not): screening
    asks this of each file's header before any inference."""
    if channels is not None and max(channels) >= n_channels:
        return f"has {n_channels} channels; `channels` asks for {list(channels)}"
    if channels is None and n_channels > 3:
        return f"has {n_channels} channels; choose 3 with `channels`, e.g. [0, 1, 2]"
    return None


class SamChannelsd(MapTransform):
    """Give SAM its 3 channels: grayscale repeated, 2 channels as red and green, 3 kept.

    ``channels`` picks up to 3 channels first (required for images with more than 3).
    """

    def __init__(self, keys: KeysCollection = "image", channels: Sequence[int] | None = None, **kw):
        super().__init__(keys, kw.pop("allow_missing_keys", False))
        if channels is not None and not 1 <= len(channels) <= 3:
            raise ValueError(f"`channels` picks 1 to 3 channels, got {list(channels)}")
        self.channels = None if channels is None else [int(c) for c in channels]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            problem = channel_problem(x.shape[0], self.channels)
            if problem:
                raise ValueError(f"{meta_of(d, key).get('filename_or_obj', key)}: {problem}")
            if self.channels is not None:
                x = x[self.channels]
            if x.shape[0] == 1:
                x = x.repeat(3, *([1] * (x.ndim - 1)))
            elif x.shape[0] == 2:
                x = torch.cat([x, torch.zeros_like(x[:1])])
            d[key] = x
        return d


def _slice_axis(meta: Mapping, override: int | None, ndim: int) -> int:
    if override is not None:
        if not 0 <= override < ndim:
            raise ValueError(f"slice_axis {override} is not a spatial axis of a {ndim}D volume")
        return override
    axial = meta_int(meta.get("axial_axis", -1))
    return axial if axial >= 0 else ndim - 1


class SampleSlicesd(Randomizable, MapTransform):
    """Training on volumes: ``num_samples`` 2D slices per volume, a ``fg_fraction`` share of them
    drawn from slices holding foreground so empty slices do not dominate. 2D images pass whole."""

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        num_samples: int = 4,
        fg_fraction: float = 0.75,
        slice_axis: int | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_key, self.num_samples, self.fg_fraction, self.slice_axis = (
            label_key,
            num_samples,
            fg_fraction,
            slice_axis,
        )

    def randomize(self, foreground: np.ndarray, total: int) -> list[int]:
        n_fg = round(self.num_samples * self.fg_fraction) if len(foreground) else 0
        picks = list(self.R.choice(foreground, n_fg)) if n_fg else []
        picks += list(self.R.choice(total, self.num_samples - n_fg))
        return [int(i) for i in picks]

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        label = d[self.label_key]
        if label.ndim == 3:
            return [d]
        axis = _slice_axis(meta_of(d, self.label_key), self.slice_axis, label.ndim - 1)
        per_slice = label.movedim(1 + axis, 0).reshape(label.shape[1 + axis], -1)
        foreground = torch.nonzero(per_slice.amax(dim=1) > 0).reshape(-1).numpy()
        samples = []
        for index in self.randomize(foreground, per_slice.shape[0]):
            item = dict(d)
            for key in self.key_iterator(d):
                x = d[key].select(1 + axis, index)
                if isinstance(x, MetaTensor):
                    x.meta = {**d[key].meta, "slice_index": index, "axial_axis": -1}
                item[key] = x
            samples.append(item)
        return samples


def _columns_first(meta: Mapping) -> bool:
    """Whether an array's in-plane axes are (x, y): as ``LoadImageAnyd`` recorded it, else by format."""
    if "columns_first" in meta:
        return bool(meta_int(meta["columns_first"]))
    return meta.get("format") in COLUMNS_FIRST


class SamInputd(MapTransform):
    """SAM's input geometry: the longest in-plane side resized to ``image_size`` (bilinear with
    antialiasing), images normalised with SAM's mean and std, then padded at the bottom and
    right to ``image_size`` x ``image_size``.

    Images: 2D (C, H, W) -> (C, S, S); a volume -> a stack of slices (C, n, S, S).
    Labels (keys not in ``image_keys``) of classes 0..``num_classes`` become one soft channel
    per class, (num_classes, S, S) or (num_classes, n, S, S): resizing the class masks rather
    than the class numbers keeps sub-pixel boundaries, so a label sent here and back through
    ``InvertSamInputd`` is nearly unchanged even where the image is shrunk.
    With ``resize=False`` (native scale, for sliding-window inference over images much larger
    than S) the image keeps its size and is only normalised and padded to at least S x S.
    ``layout="display"`` first swaps the in-plane axes of (x, y) arrays (NIfTI, DICOM) so that
    rows run along y, as viewers show them; ``"stored"`` keeps every array as read.
    The geometry is recorded in the metadata for ``InvertSamInputd``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        image_size: int = 1024,
        image_keys: KeysCollection = ("image",),
        num_classes: int = 1,
        slice_axis: int | None = None,
        resize: bool = True,
        layout: str = "display",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.size = int(image_size)
        self.image_keys = {image_keys} if isinstance(image_keys, str) else set(image_keys)
        self.num_classes = int(num_classes)
        self.slice_axis = slice_axis
        self.resize = flag(resize)
        self.layout = layout

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = dict(meta_of(d, key))
            axis = -1
            if x.ndim == 4:
                axis = _slice_axis(meta, self.slice_axis, 3)
                x = x.movedim(1 + axis, 1)  # C, n, H, W
            stack = torch.as_tensor(x).reshape(x.shape[0], -1, *x.shape[-2:]).transpose(0, 1)  # n, C, H, W
            transposed = self.layout == "display" and _columns_first(meta)
            if transposed:  # (x, y) -> rows along y, as displayed
                stack = stack.transpose(-2, -1)
            H, W = stack.shape[-2:]
            scale = self.size / max(H, W) if self.resize else 1.0
            resized = (int(H * scale + 0.5), int(W * scale + 0.5))  # as SAM's ResizeLongestSide
            if key not in self.image_keys:  # class numbers -> one mask per class
                stack = class_masks(stack.transpose(0, 1), self.num_classes).transpose(0, 1)
            stack = F.interpolate(stack, resized, mode="bilinear", align_corners=False, antialias=True)
            if key in self.image_keys:
                mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
                stack = (stack - mean) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
            padded = (max(self.size, resized[0]), max(self.size, resized[1]))  # native scale: at least one tile
            stack = F.pad(stack, (0, padded[1] - resized[1], 0, padded[0] - resized[0]))
            out = stack.transpose(0, 1)
            out = out if axis >= 0 else out[:, 0]
            meta.update(sam_slice_axis=axis, sam_in_plane=(H, W), sam_resized=resized, sam_size=self.size)
            meta["sam_transposed"] = transposed  # sam_in_plane is (H, W) as the network sees it
            d[key] = MetaTensor(out.contiguous(), meta=meta)
        return d


def invert_sam_geometry(pred: torch.Tensor, meta: Mapping, mode: str = "bilinear") -> torch.Tensor:
    """(K, S, S) or (K, n, S, S) in SAM's geometry -> (K, *spatial) on the input's grid (in-plane
    axes swapped back where ``SamInputd`` swapped them).

    Logits and soft class masks are interpolated bilinearly; ``mode="nearest"`` keeps values."""
    h, w = meta_pair(meta["sam_resized"])
    H, W = meta_pair(meta["sam_in_plane"])
    axis = meta_int(meta["sam_slice_axis"])
    stack = torch.as_tensor(pred).reshape(pred.shape[0], -1, *pred.shape[-2:]).transpose(0, 1)
    stack = stack[..., :h, :w].float()
    if mode == "nearest":
        stack = F.interpolate(stack, (H, W), mode="nearest-exact")
    else:
        stack = F.interpolate(stack, (H, W), mode="bilinear", align_corners=False)
    if bool(meta_int(meta.get("sam_transposed", False))):
        stack = stack.transpose(-2, -1)
    out = stack.transpose(0, 1)
    return out.movedim(1, 1 + axis) if axis >= 0 else out[:, 0]


class InvertSamInputd(MapTransform):
    """Undo ``SamInputd`` on predictions: crop the padding, resize back (bilinear for logits),
    swap the in-plane axes back where they were swapped, restore the slice axis. The geometry is
    read from ``ref_key``'s metadata."""

    def __init__(self, keys: KeysCollection = "pred", ref_key: str = "image", mode: str = "bilinear", **kw):
        super().__init__(keys, kw.pop("allow_missing_keys", False))
        self.ref_key, self.mode = ref_key, mode

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = meta_of(d, self.ref_key)
        for key in self.key_iterator(d):
            d[key] = invert_sam_geometry(d[key], meta, self.mode)
        return d
