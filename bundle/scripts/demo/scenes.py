"""Synthetic scenes of several object kinds, for pretraining the `tiny` generalist and for
testing that prompt tuning really learns a specialist task.

A scene is an RGB image (0..255) with 2-6 objects (ellipses, rectangles, triangles) of
random colours and textures on a textured background, with one mask per object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .noise import smooth_noise

KINDS = ("ellipse", "rectangle", "triangle")


@dataclass
class Scene:
    image: np.ndarray  # (3, H, W) float32, 0..255
    masks: np.ndarray  # (k, H, W) bool, one per visible object


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    r = rng.uniform(0.06, 0.16) * size
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    aspect = rng.uniform(0.5, 1.0)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    if kind == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    # triangle: three half-planes around the centre
    inside = np.ones((size, size), bool)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        inside &= np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy) <= 0.6 * r
    return inside


def make_scene(rng: np.random.Generator, size: int = 256, style: str = "plain") -> Scene:
    """``style`` 'plain', or 'shifted' (darker, striped, low-contrast: a domain shift)."""
    base = rng.uniform(40, 140, 3)
    background = base[:, None, None] + 18 * smooth_noise(rng, (size, size), rng.uniform(3, 12))[None]
    if style == "shifted":
        stripes = 25 * np.sin(np.arange(size) / rng.uniform(3, 8))[None, None, :]
        background = 0.5 * background + stripes
    image = background.astype(np.float64)
    masks = []
    for _ in range(rng.integers(2, 7)):
        kind = KINDS[rng.integers(len(KINDS))]
        mask = _shape_mask(rng, kind, size)
        colour = rng.uniform(60, 255, 3)
        if style == "shifted":
            colour = 0.5 * colour + 0.3 * base
        fill = colour[:, None, None] + 15 * smooth_noise(rng, (size, size), rng.uniform(1, 4))[None]
        image = np.where(mask[None], fill, image)
        masks = [m & ~mask for m in masks]  # the new object occludes older ones
        masks.append(mask)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 30]
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.float32)
    return Scene(image, np.stack([masks[i] for i in keep]))
