"""DICOM SEG of a DICOM series (highdicom): read back, it references the source and holds the label."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from scripts.data.io import read_image
from scripts.data.io.dicom_seg import check_seg_source, write_dicom_seg
from scripts.data.io.readers import ImageReadError, series_files


def _series(synthetic: Path) -> str:
    return str(next((synthetic / "ct" / "dicom").iterdir()))


def _label(image: np.ndarray) -> np.ndarray:
    """Two classes in the series' (x, y, z) grid, asymmetric so a flipped axis would show."""
    label = np.zeros(image.shape[1:], np.int64)
    label[image[0] > 0] = 1
    label[: image.shape[1] // 3, : image.shape[2] // 2, 2:5] = 2
    return label


def test_seg_references_the_series_and_holds_the_label(synthetic, tmp_path):
    series = _series(synthetic)
    image, _ = read_image(series)
    label = _label(image)
    path = write_dicom_seg(label, series, ["tissue", "marker"], tmp_path / "ct_seg.dcm")
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f) for f in series_files(series)]
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tissue", "marker"]
    uids = [ds.SOPInstanceUID for ds in sources]
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    # every frame sits where its source instance does
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(position, sources[uids.index(source)].ImagePositionPatient, atol=1e-4)
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    assert np.array_equal(masks, np.transpose(label, (2, 1, 0)))  # instances x rows x columns


def test_a_label_of_another_shape_is_refused(synthetic, tmp_path):
    series = _series(synthetic)
    image, _ = read_image(series)
    with pytest.raises(ValueError, match="does not fit"):
        write_dicom_seg(_label(image)[..., :-1], series, ["tissue", "marker"], tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="only 1 class names"):
        write_dicom_seg(_label(image), series, ["tissue"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_a_source_without_frame_of_reference_is_refused(synthetic, tmp_path):
    series = Path(shutil.copytree(_series(synthetic), tmp_path / "series"))
    first = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(first)
    del ds.FrameOfReferenceUID
    ds.save_as(first)
    image, _ = read_image(str(series))
    with pytest.raises(ImageReadError, match="no FrameOfReferenceUID"):
        write_dicom_seg(_label(image), str(series), ["tissue", "marker"], tmp_path / "x.dcm")


# Type 2 patient and study attributes (present, maybe empty) that anonymisers often remove.
ANONYMISED = (
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


def test_an_anonymised_series_gets_a_seg_with_those_attributes_empty(synthetic, tmp_path):
    series = Path(shutil.copytree(_series(synthetic), tmp_path / "series"))
    for file in series.iterdir():
        ds = pydicom.dcmread(file)
        for keyword in (*ANONYMISED, "Modality"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(file)
    image, _ = read_image(str(series))
    label = _label(image)
    check_seg_source(str(series))
    seg = hd.seg.segread(write_dicom_seg(label, str(series), ["tissue", "marker"], tmp_path / "seg.dcm"))
    assert all(keyword in seg and str(seg.get(keyword) or "") == "" for keyword in ANONYMISED)
    sources = [pydicom.dcmread(f) for f in series_files(str(series))]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert not any(keyword in ds for ds in sources for keyword in (*ANONYMISED, "Modality"))  # files untouched
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], combine_segments=True
    )
    assert np.array_equal(masks, np.transpose(label, (2, 1, 0)))


def test_a_multiframe_instance_is_refused_from_its_header(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "mf.dcm")
    with pytest.raises(ValueError, match=r"mf.dcm: a multi-frame instance \(2 frames\)"):
        check_seg_source(str(tmp_path / "mf.dcm"))
    label = np.zeros((100, 100, 2), np.int64)
    with pytest.raises(ValueError, match="a multi-frame instance"):
        write_dicom_seg(label, str(tmp_path / "mf.dcm"), ["tissue"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
