"""Qwen2.5-VL image preprocessing: PIL images -> flattened patches and their (t, h, w) grids.

Each image is converted to RGB (transparency composited onto white), resized with PIL bicubic so
both sides are multiples of patch * merge and the area lies within [min_pixels, max_pixels],
rescaled to [0, 1], normalised with the OpenAI CLIP mean/std, repeated over the temporal patch
(a still image is one temporal step), and cut into patches ordered merge block by merge block,
each flattened as (channel, time, row, col), the Conv3d weight's layout.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size nearest (height, width) with both sides multiples of factor and area in range."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class QwenImageProcessor:
    def __init__(
        self,
        *,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        patch_size: int = 14,
        merge_size: int = 2,
        temporal_patch_size: int = 2,
        image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, ...] = OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
        resample: int = Image.Resampling.BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
    ) -> None:
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "QwenImageProcessor":
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
        with open(path) as f:
            d = json.load(f)
        size = d.get("size") or {}
        kwargs = {
            # Explicit min/max_pixels win over "size", as in transformers.
            "min_pixels": d.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": d.get("max_pixels", size.get("longest_edge")),
        }
        for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "rescale_factor",
                    "resample", "do_resize", "do_rescale", "do_normalize"):
            kwargs[key] = d.get(key)
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": True,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, image: Image.Image) -> int:
        """Merged tokens the image becomes in the language model: (h/p)(w/p) / merge^2."""
        h, w = self.resized_size(image.height, image.width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def __call__(self, images: Image.Image | list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values (N, 3 * tp * p * p) float32, grid_thw (n_images, 3) long."""
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images must be a PIL image or a non-empty list of them, got {type(images).__name__}")
        patches, grids = [], []
        for i, image in enumerate(images):
            p, grid = self._one(i, image)
            patches.append(p)
            grids.append(grid)
        return torch.from_numpy(np.concatenate(patches)), torch.tensor(grids, dtype=torch.long)

    def _one(self, index: int, image: Image.Image) -> tuple[np.ndarray, list[int]]:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {index} must be a PIL.Image.Image, got {type(image).__name__}")
        try:
            rgb = _to_rgb(image)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL decodes lazily: a corrupt file fails here
            raise ValueError(f"image {index} could not be read: {exc}") from exc
        h, w = self.resized_size(rgb.height, rgb.width)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), resample=self.resample)
        if h % (self.patch_size * self.merge_size) or w % (self.patch_size * self.merge_size):
            raise ValueError(f"image {index}: {h}x{w} is not a multiple of patch_size * merge_size (do_resize is off)")
        x = np.asarray(rgb).transpose(2, 0, 1)  # (C, H, W) uint8
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return self._patchify(x), [1, h // self.patch_size, w // self.patch_size]

    def _patchify(self, x: np.ndarray) -> np.ndarray:
        c, h, w = x.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        blocks = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, p, p)
        blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], tp, p, p))
        return np.ascontiguousarray(blocks).reshape(gh * gw, c * tp * p * p)


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
