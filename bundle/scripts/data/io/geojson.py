"""Objects of a 2D label map as polygons: a GeoJSON FeatureCollection that QuPath imports
(File > Import objects), one feature per object with its class as the classification.

Coordinates are QuPath's pixel coordinates: x to the right, y down, pixel (row i, column j)
covering [j, j+1) x [i, i+1). Rings run through the midpoints between an object's edge pixels
and their outside neighbours, so the pixels whose centres fall inside are the object's own
(``rasterise`` gives the label map back). Holes are interior rings; an object whose parts touch
only at a corner is a MultiPolygon.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import atomic_write

# QuPath's classification colours, packed as RGB: one per class, cycling.
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed rings (N, 2) of x, y around ``mask``'s pixels, collinear points dropped."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for contour in find_contours(padded, 0.5):  # (row, col) in the padded grid
        ring = approximate_polygon(contour, tolerance=0)
        xy = np.stack([ring[:, 1] - 1 + 0.5, ring[:, 0] - 1 + 0.5], axis=1)  # to pixel-corner coordinates
        if len(xy) >= 4:
            rings.append(xy)
    return rings


def object_geometry(mask: np.ndarray) -> dict[str, Any]:
    """A GeoJSON Polygon (or MultiPolygon) for one object's 2D boolean ``mask``."""
    from skimage.measure import points_in_poly

    rings = _rings(mask)
    if not rings:
        raise ValueError("the object mask is empty")
    outer_sign = np.sign(_signed_area(max(rings, key=lambda r: abs(_signed_area(r)))))
    outers = [r for r in rings if np.sign(_signed_area(r)) == outer_sign]
    holes = [r for r in rings if np.sign(_signed_area(r)) != outer_sign]
    # GeoJSON's right-hand rule on the numbers as written: exteriors counter-clockwise, holes clockwise.
    polygons = []
    for outer in outers:
        own = [h for h in holes if points_in_poly(h[:1], outer)[0]]
        polygons.append([_closed(outer, clockwise=False)] + [_closed(h, clockwise=True) for h in own])
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _closed(ring: np.ndarray, clockwise: bool) -> list[list[float]]:
    if (_signed_area(ring) < 0) != clockwise:
        ring = ring[::-1]
    points = [[float(x), float(y)] for x, y in ring]
    if points[0] != points[-1]:
        points.append(points[0])
    return points


def label_features(
    classes: np.ndarray, objects: np.ndarray, class_names: Sequence[str], source: str = ""
) -> dict[str, Any]:
    """A FeatureCollection of the objects in ``objects`` (2D instance ids, 0 background), each
    classified by its value in ``classes`` (2D class label map: 1..C, named by ``class_names``).
    Both are indexed (row, column): transpose the (x, y) arrays of NIfTI and DICOM first."""
    if classes.ndim != 2 or objects.shape != classes.shape:
        raise ValueError(
            f"{source or 'the label'}: polygons are drawn on 2D images; this label has shape {classes.shape}"
        )
    features = []
    for object_id in (int(i) for i in np.unique(objects) if i > 0):
        mask = objects == object_id
        cls = int(np.bincount(classes[mask].astype(np.int64)).argmax())
        name = class_names[cls - 1] if 0 < cls <= len(class_names) else f"class {cls}"
        r, g, b = _COLOURS[(cls - 1) % len(_COLOURS)]
        features.append(
            {
                "type": "Feature",
                "geometry": object_geometry(mask),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} {len(features) + 1}",
                    "classification": {"name": name, "color": [r, g, b]},
                    "label": cls,
                    "area_px": int(mask.sum()),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def rasterise(collection: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """The class label map (``properties.label`` per object) of a FeatureCollection's polygons."""
    from skimage.draw import polygon

    out = np.zeros(shape, np.int32)
    for feature in collection["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        mask = np.zeros(shape, bool)
        for rings in polygons:
            for k, ring in enumerate(rings):
                xy = np.asarray(ring)
                rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)  # pixel centres inside
                mask[rr, cc] = k == 0  # the exterior fills, holes clear
        out[mask] = int(feature["properties"]["label"])
    return out


def write_geojson(collection: dict[str, Any], path: str | Path) -> Path:
    """Write the FeatureCollection atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(collection)))
