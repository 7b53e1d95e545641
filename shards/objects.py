"""Which visual tokens cover a shape: the per-patch object map of a synthetic scene.

Every synthetic sample's json holds its scene (background, each shape's kind and box), so the map
is derived from the shards themselves, old ones included, for whatever patch grid the vision tower
has (the shard writer cannot know it): each shape is drawn again as a binary mask with the
renderer's own `_draw_shape`, and a patch covers a shape when at least `min_cover` of its pixels
belong to it. Square images only: the CLIP processor resizes them to the tower's input as a whole.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import _draw_shape

BACKGROUND, BIG, SMALL = 0, 1, 2  # map values; a patch covered by both holds SMALL


def object_map(scene: dict, image_size: int, grid: int, min_cover: float = 0.1) -> np.ndarray:
    """[grid * grid] int8 in row-major patch order (the vision tower's token order): SMALL where
    a small shape covers >= min_cover of the patch, else BIG where the big shape does, else BACKGROUND."""
    out = np.full(grid * grid, BACKGROUND, dtype=np.int8)
    for label, shapes in ((BIG, [scene["big"]]), (SMALL, scene["small"])):
        cover = _patch_cover(shapes, image_size, grid)
        out[cover >= min_cover] = label
    return out


def _patch_cover(shapes, image_size: int, grid: int) -> np.ndarray:
    """[grid * grid] share of each patch's pixels inside any of `shapes`."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    for s in shapes:
        _draw_shape(draw, s["kind"], s["box"], 255)
    px = np.asarray(mask, dtype=np.float32) / 255.0
    edges = np.linspace(0, image_size, grid + 1).round().astype(int)  # patch borders in pixels
    rows = np.add.reduceat(px, edges[:-1], axis=0)
    cells = np.add.reduceat(rows, edges[:-1], axis=1)
    area = np.outer(np.diff(edges), np.diff(edges))
    return (cells / area).reshape(-1)
