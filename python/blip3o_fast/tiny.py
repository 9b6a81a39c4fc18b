"""The tiny random model: the full BLIP3-o architecture at toy size, built from a fixed seed.

No download and no file: the tokenizer is trained on a fixed corpus and the weights come from the
seed, so every machine builds the same model. Its weights are random, so its images and answers are
noise; it exists to run every stage of the engine end to end (tests, `--model tiny`) and is the starting
point of the shapes recipe. The trained model the README's demo runs ships in blip3o_fast.weights.
"""

from __future__ import annotations

from blip3o_fast.models.blip3o import BLIP3o
from blip3o_fast.models.config import BLIP3oConfig
from blip3o_fast.tokenizer import build_tiny_tokenizer


def embedding_rows(tokenizer) -> int:
    """The tokenizer's size rounded up to a multiple of 64, as Qwen pads its embedding matrices."""
    return ((len(tokenizer) + 63) // 64) * 64


def tiny_model(backbone: str = "qwen2_5_vl", seed: int = 0) -> BLIP3o:
    tokenizer = build_tiny_tokenizer(backbone)
    return BLIP3o.from_config(BLIP3oConfig.tiny(backbone, vocab_size=embedding_rows(tokenizer)), seed=seed,
                              tokenizer=tokenizer)
