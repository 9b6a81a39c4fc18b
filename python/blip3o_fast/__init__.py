"""blip3o_fast: a compiled engine for BLIP3-o (text->text, image->text, text->image, image editing)."""

from blip3o_fast import ops
from blip3o_fast.models.blip3o import BLIP3o, BLIP3oNetwork
from blip3o_fast.models.config import BLIP3oConfig, DiTConfig, PixelDecoderConfig, TextConfig, VisionConfig

__version__ = "0.1.0"

__all__ = [
    "BLIP3o",
    "BLIP3oConfig",
    "BLIP3oNetwork",
    "DiTConfig",
    "PixelDecoderConfig",
    "TextConfig",
    "VisionConfig",
    "ops",
]
