"""A label of a DICOM series as a DICOM Segmentation object (highdicom), for PACS and viewers
(OHIF, 3D Slicer): one frame per source instance and segment, referencing the source series and
instances, segments named by the classes, in the source's frame of reference.

The label arrives as the reader made the image: (x, y, z) with z in the series' file order
(``readers.series_files``); frame k is ``label[:, :, k]`` transposed to DICOM's rows x columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import atomic_write
from .readers import ImageReadError, series_files

# What highdicom copies from the first source into every SEG: Type 2 attributes of the Patient
# and General Study modules (present, possibly empty) and the Modality. An anonymised series may
# lack them; its SEG then carries them empty (Modality: OT, other).
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _source_datasets(image: str, pixels: bool = True) -> list[Any]:
    """The series' datasets as read (copies: the files are not touched), refused where a SEG
    cannot reference them, absent patient and study attributes filled in empty."""
    import pydicom

    datasets = [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in series_files(image)]
    for ds, name in ((ds, getattr(ds, "filename", image)) for ds in datasets):
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:  # the SEG's frames follow the source instances, one frame each
            raise ValueError(
                f"{name}: a multi-frame instance ({frames} frames); a DICOM SEG is written for series "
                "of single-frame instances"
            )
        for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not getattr(ds, keyword, None):
                raise ImageReadError(f"{name}: no {keyword}; a DICOM SEG cannot reference this image")
        for keyword in _TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if not ds.get("Modality"):
            ds.Modality = "OT"
    return datasets


def check_seg_source(image: str) -> None:
    """Refuse, from the headers alone, a DICOM series no SEG can be written for (before inference)."""
    _source_datasets(image, pixels=False)


def segment_descriptions(class_names: Sequence[str], algorithm: str, version: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, name in enumerate(class_names, start=1)
    ]


def write_dicom_seg(
    label: np.ndarray,
    image: str,
    class_names: Sequence[str],
    path: str | Path,
    algorithm: str = "PTSAM",
    version: str = "0",
) -> Path:
    """Write ``label`` ((x, y, z) or (x, y) of class numbers 1..C) for the DICOM series ``image``."""
    import highdicom as hd

    sources = _source_datasets(image)
    frames = np.asarray(label)
    frames = frames[..., None] if frames.ndim == 2 else frames
    if frames.shape[2] != len(sources) or frames.shape[:2] != (sources[0].Columns, sources[0].Rows):
        raise ValueError(
            f"{image}: label shape {label.shape} does not fit {len(sources)} instances of "
            f"{sources[0].Rows} x {sources[0].Columns}"
        )
    top = int(frames.max()) if frames.size else 0
    if top > len(class_names):
        raise ValueError(f"{image}: label value {top} but only {len(class_names)} class names")
    pixels = np.ascontiguousarray(np.transpose(frames, (2, 1, 0))).astype(np.uint8)  # instances, rows, columns
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, algorithm, version),
        series_instance_uid=hd.UID(),
        series_number=(int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000) % 100000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="PTSAM bundle",
        manufacturer_model_name=algorithm,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{algorithm} segmentation",
        omit_empty_frames=False,
    )
    return atomic_write(path, lambda tmp: seg.save_as(tmp))
