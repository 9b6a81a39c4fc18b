"""A deterministic reader of shapes-world images (numpy only): image -> background + objects.

1. Background: the dominant colour of the image border (border pixels binned to 32 levels per channel; the
   fullest bin's mean). Unless at least PLAIN_BORDER_FRACTION of the border lies within FOREGROUND_DISTANCE of
   it, the image has no plain background (noise, clutter): background "none", no objects.
2. Candidates: 8-connected components of the pixels farther than FOREGROUND_DISTANCE (RGB Euclidean) from the
   background; components smaller than MIN_AREA_FRACTION of the image are noise and dropped.
3. Objects: each candidate is re-thresholded at half its own contrast (interior mean vs background: the edge
   where a rendered shape covers half a pixel, whatever the colours) and split into that mask's components,
   so a blur that bridges two nearby objects does not merge them; small pieces are dropped again.
4. Colour: the mean of an object's interior pixels (those whose four neighbours are in it too, so soft edges
   do not pull the mean toward the background), nearest named colour in RGB.
5. Shape: template matching on the mask's geometry. For each shape the upright template of the object's
   area, centred on its centroid, is rasterised (a square's fill of its box is 1, a circle's pi/4, a
   triangle's 1/2, so equal-area templates differ in extent and corners); the best intersection-over-union
   wins, and a mask that no template covers with IoU >= MIN_SHAPE_IOU is "other". Unlike a bounding-box fill
   ratio, one stray noise pixel moves the IoU by one pixel's worth, not by a whole row of the box. A mask
   whose box spans more than MAX_EXTENT_FRACTION of the image side is "other" too (objects are 12-28%).
6. Position: the centroid's named position (world.position_of); counts follow from the object list.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from blip3o_fast.shapes.world import BACKGROUNDS, COLOURS, SHAPES, position_of, shape_mask

BORDER = 2  # pixels of the border ring that vote for the background
FOREGROUND_DISTANCE = 60.0  # well below the closest object/background pair (purple on gray, about 110)
MIN_AREA_FRACTION = 0.004  # 16 px at 64x64; the smallest object (a 12 px triangle) has about 70
MIN_SHAPE_IOU = 0.7  # clean renders score 0.85-1.0 with their own template
MAX_EXTENT_FRACTION = 0.5
PLAIN_BORDER_FRACTION = 0.5

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_TABLE = np.asarray([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_TABLE = np.asarray([BACKGROUNDS[c] for c in _BACKGROUND_NAMES], dtype=np.float64)


@dataclass
class DetectedObject:
    shape: str  # circle | square | triangle | other
    colour: str
    position: str
    x: float  # centroid, pixels
    y: float
    area: int
    iou: float  # of the winning template
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    mean_rgb: tuple[float, float, float]


@dataclass
class Analysis:
    width: int
    height: int
    background: str  # nearest named background colour; "none" when the border is not plain
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject]


def as_array(image) -> np.ndarray:
    """PIL image or array -> (H, W, 3) float64."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def border_colour(image: np.ndarray) -> np.ndarray | None:
    """The dominant border colour, or None when the border is not mostly one plain colour."""
    b = BORDER
    ring = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                           image[b:-b, :b].reshape(-1, 3), image[b:-b, -b:].reshape(-1, 3)])
    bins = np.clip(ring // 8, 0, 31).astype(np.int64)
    codes = (bins[:, 0] * 32 + bins[:, 1]) * 32 + bins[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    colour = ring[codes == values[np.argmax(counts)]].mean(axis=0)
    near = np.sqrt(((ring - colour) ** 2).sum(axis=1)) <= FOREGROUND_DISTANCE
    return colour if near.mean() >= PLAIN_BORDER_FRACTION else None


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each an (N, 2) array of (row, col), in raster order of their
    first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr in (r - 1, r, r + 1):
                for cc in (c - 1, c, c + 1):
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        out.append(np.asarray(pixels, dtype=np.int64))
    return out


def nearest(rgb: np.ndarray, names: tuple[str, ...], table: np.ndarray) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def interior_mean(pixels: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Mean colour of the component's pixels whose four neighbours are in it too (all of them if none are)."""
    rows, cols = comp[:, 0], comp[:, 1]
    y0, x0 = rows.min(), cols.min()
    local = np.zeros((rows.max() - y0 + 3, cols.max() - x0 + 3), dtype=bool)
    local[rows - y0 + 1, cols - x0 + 1] = True
    interior = local[1:-1, 1:-1] & local[:-2, 1:-1] & local[2:, 1:-1] & local[1:-1, :-2] & local[1:-1, 2:]
    ir, ic = np.nonzero(interior)
    return pixels[ir + y0, ic + x0].mean(axis=0) if len(ir) else pixels[rows, cols].mean(axis=0)


# Side of each shape's bounding box for a given area: square a^2, circle pi (a/2)^2, triangle a^2 / 2.
_SIZE_PER_SQRT_AREA = {"square": 1.0, "circle": 2 / np.sqrt(np.pi), "triangle": np.sqrt(2.0)}


def classify_shape(comp: np.ndarray, cx: float, cy: float, width: int, height: int) -> tuple[str, float]:
    """(best shape or "other", its IoU) by equal-area upright templates at the centroid."""
    extent = max(np.ptp(comp[:, 1]) + 1, np.ptp(comp[:, 0]) + 1)
    if extent > MAX_EXTENT_FRACTION * min(width, height):
        return "other", 0.0
    mask = np.zeros((height, width), dtype=bool)
    mask[comp[:, 0], comp[:, 1]] = True
    best, best_iou = "other", 0.0
    for shape in SHAPES:
        template = shape_mask(shape, cx, cy, _SIZE_PER_SQRT_AREA[shape] * np.sqrt(len(comp)), width, height)
        iou = float((mask & template).sum() / max(1, (mask | template).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else "other"), best_iou


def analyse(image) -> Analysis:
    pixels = as_array(image)
    h, w, _ = pixels.shape
    if min(h, w) <= 2 * BORDER:
        raise ValueError(f"image too small to analyse: {w}x{h}")
    background = border_colour(pixels)
    if background is None:
        return Analysis(w, h, "none", (float("nan"),) * 3, [])
    distance = np.sqrt(((pixels - background) ** 2).sum(axis=2))
    min_area = max(1, int(round(MIN_AREA_FRACTION * h * w)))
    objects = []
    for candidate in components(distance > FOREGROUND_DISTANCE):
        if len(candidate) < min_area:
            continue
        contrast = float(np.sqrt(((interior_mean(pixels, candidate) - background) ** 2).sum()))
        core = np.zeros((h, w), dtype=bool)
        keep = candidate[distance[candidate[:, 0], candidate[:, 1]] > 0.5 * contrast]
        core[keep[:, 0], keep[:, 1]] = True
        for piece in components(core):
            if len(piece) < min_area:
                continue
            mean_rgb = interior_mean(pixels, piece)
            # Pixel centres sit at +0.5, as in the renderer's coordinates.
            cx, cy = float(piece[:, 1].mean() + 0.5), float(piece[:, 0].mean() + 0.5)
            shape, iou = classify_shape(piece, cx, cy, w, h)
            objects.append(DetectedObject(
                shape=shape,
                colour=nearest(mean_rgb, _COLOUR_NAMES, _COLOUR_TABLE),
                position=position_of(cx, cy, w, h),
                x=cx, y=cy, area=len(piece), iou=iou,
                bbox=(int(piece[:, 1].min()), int(piece[:, 0].min()), int(piece[:, 1].max()), int(piece[:, 0].max())),
                mean_rgb=tuple(float(v) for v in mean_rgb),
            ))
    return Analysis(w, h, nearest(background, _BACKGROUND_NAMES, _BACKGROUND_TABLE),
                    tuple(float(v) for v in background), objects)
