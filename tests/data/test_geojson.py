"""Objects as GeoJSON polygons for QuPath: rasterised back, they are the label map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from scripts.data.io.geojson import label_features, rasterise
from scripts.data.postprocess import WriteGeoJSONd, instance_labels
from scripts.data.transforms import LoadImageAnyd


def _scene() -> np.ndarray:
    label = np.zeros((64, 80), np.int64)
    yy, xx = np.mgrid[:64, :80]
    radius = np.hypot(yy - 20, xx - 24)
    label[(radius < 10) & (radius > 4)] = 1  # a ring: one polygon with a hole
    label[40, 40] = label[41, 41] = 1  # corner to corner: two objects
    label[0:5, 60:80] = 2  # a rod of class 2 on the image border
    label[55, 5] = 1  # one pixel
    label[50:60, 20:23] = 2
    return label


def test_polygons_rasterise_back_to_the_label_map():
    label = _scene()
    collection = label_features(label, instance_labels(label), ["cell", "rod"])
    features = collection["features"]
    assert len(features) == 6
    assert [f["properties"]["classification"]["name"] for f in features].count("rod") == 2
    ring = next(f for f in features if f["properties"]["area_px"] == int(((label == 1)[:32, :40]).sum()))
    assert ring["geometry"]["type"] == "Polygon" and len(ring["geometry"]["coordinates"]) == 2  # exterior + hole
    assert np.array_equal(rasterise(collection, label.shape), label)


def test_rings_are_closed_and_follow_the_right_hand_rule():
    label = _scene()
    for feature in label_features(label, instance_labels(label), ["cell", "rod"])["features"]:
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            xy = np.asarray(ring)
            assert np.array_equal(xy[0], xy[-1])
            area = 0.5 * np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1])
            assert (area > 0) == (k == 0)  # exterior counter-clockwise, holes clockwise


def test_coordinates_are_pixel_corners():
    """QuPath's pixel (row i, column j) covers [j, j+1) x [i, i+1): a 2 x 3 block at row 4,
    column 10 spans x 10..13, y 4..6 (through its edge midpoints, half a pixel in)."""
    label = np.zeros((10, 20), np.int64)
    label[4:6, 10:13] = 1
    ring = np.asarray(label_features(label, label, ["cell"])["features"][0]["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 10.0 and ring[:, 0].max() == 13.0
    assert ring[:, 1].min() == 4.0 and ring[:, 1].max() == 6.0


def test_a_volume_is_refused():
    with pytest.raises(ValueError, match="polygons are drawn on 2D images"):
        label_features(np.ones((2, 4, 4), np.int64), np.ones((2, 4, 4), np.int64), ["cell"], "vol.nii.gz")


@pytest.mark.parametrize("name", ["xray.dcm", "slide.nii.gz"])
def test_polygons_of_a_dicom_or_nifti_image_are_in_its_pixel_coordinates(tmp_path, name):
    """DICOM and NIfTI arrays are read (x, y); the polygons must still have x along the columns
    of the image as a viewer shows it (DICOM's rows and columns)."""
    rows_cols = np.zeros((40, 56), np.int16)  # an L: a bar along rows 4..8, one down columns 30..34
    rows_cols[4:9, 30:50] = 1
    rows_cols[4:30, 30:35] = 1
    image = sitk.GetImageFromArray(rows_cols * 300)  # SimpleITK: x is the column
    sitk.WriteImage(image, str(tmp_path / name))
    if name.endswith(".dcm"):
        assert np.array_equal(pydicom.dcmread(tmp_path / name).pixel_array, rows_cols * 300)
    d = LoadImageAnyd("image")({"image": str(tmp_path / name)})
    d["pred"] = (d["image"] > 100).float()  # (1, x, y), as the network's label comes back
    out = WriteGeoJSONd("pred", output_dir=str(tmp_path / "out"), class_names=["bone"])(d)
    collection = json.loads(Path(out["pred_geojson_path"]).read_text())
    ring = np.asarray(collection["features"][0]["geometry"]["coordinates"][0])
    assert (ring[:, 0].min(), ring[:, 0].max(), ring[:, 1].min(), ring[:, 1].max()) == (30, 50, 4, 30)
    assert np.array_equal(rasterise(collection, rows_cols.shape), rows_cols)
