"""The two kinds of training sample every reader yields, and how a conversation becomes one.

A conversation comes either in the LLaVA format (``[{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]``)
or in the transformers chat format (``[{"role": ..., "content": [{"type": "image"}, {"type": "text", ...}]}]``).
Its image placeholders take the sample's images in order. A conversation whose last assistant turn is exactly
one image placeholder is a generation sample (the released BLIP3-o convention, spec 7.2: human asks "Please
generate image based on the following caption: ...", gpt answers "<image>"): the placeholder in the assistant
turn is the target image, placeholders in earlier user turns are its source images (editing / image-conditioned
generation). Anything else is an understanding sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch
from PIL import Image

GENERATION = "generation"
UNDERSTANDING = "understanding"
TASKS = (GENERATION, UNDERSTANDING)

# The released training prompt (spec 2.5); the same text as tokenizer.GENERATION_INSTRUCTION, repeated here so
# that the data layer does not import transformers.
GENERATION_PREFIX = "Please generate image based on the following caption: "
IMAGE_PLACEHOLDER = "<image>"

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class GenerationSample:
    """One text(+images) -> image example.

    image: the image to generate; None when a precomputed ``target`` exists and the source has no image.
    target: precomputed target (float32): CLIP-style features (64, D) or VAE latents (C, h, w).
    source_images: input images for editing / image-conditioned generation; empty for text-to-image.
    """

    key: str
    caption: str
    image: Image.Image | None = None
    target: torch.Tensor | None = None
    source_images: list[Image.Image] = field(default_factory=list)

    task = GENERATION


@dataclass
class UnderstandingSample:
    """One image(s)+text -> text example; ``messages`` in the transformers chat format, whose
    ``{"type": "image"}`` parts take ``images`` in order."""

    key: str
    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)

    task = UNDERSTANDING


Sample = Union[GenerationSample, UnderstandingSample]


class InvalidSample(ValueError):
    """A record that cannot become a sample; ``reason`` is the DataStats counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _text_parts(text: str) -> list[dict]:
    """Split LLaVA text on ``<image>`` into transformers content parts. The newline that LLaVA puts right after
    (or before) a placeholder is layout, not text, so one is dropped on each side of each placeholder, and
    whitespace-only pieces are dropped."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            if piece.startswith("\n"):
                piece = piece[1:]
        if i < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece.strip():  # whitespace between placeholders is layout too
            parts.append({"type": "text", "text": piece})
    return parts


def messages_from_llava(turns: Any) -> list[dict]:
    """LLaVA ``conversations`` -> transformers chat messages (content always a list of parts)."""
    if not isinstance(turns, list) or not turns:
        raise InvalidSample("bad_conversation", "conversations must be a non-empty list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _LLAVA_ROLES:
            raise InvalidSample("bad_conversation", f"bad turn {str(turn)[:80]!r}")
        messages.append({"role": _LLAVA_ROLES[turn["from"]], "content": _text_parts(turn["value"])})
    return messages


def normalize_messages(messages: Any) -> list[dict]:
    """Transformers chat messages with string or list content -> list content; ``<image>`` inside string
    content counts as a placeholder, as in LLaVA text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidSample("bad_conversation", "messages must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise InvalidSample("bad_conversation", f"bad message {str(message)[:80]!r}")
        content = message.get("content")
        if isinstance(content, str):
            parts = _text_parts(content)
        elif isinstance(content, list) and all(
            isinstance(p, dict) and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
            for p in content
        ):
            parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in content]
        else:
            raise InvalidSample("bad_conversation", f"bad content {str(content)[:80]!r}")
        out.append({"role": message["role"], "content": parts})
    return out


def count_placeholders(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for m in messages for part in m["content"])


def is_generation(messages: list[dict]) -> bool:
    """True when the last turn is the assistant answering with exactly one image."""
    last = messages[-1]
    return last["role"] == "assistant" and last["content"] == [{"type": "image"}]


def generation_caption(messages: list[dict]) -> str:
    """The caption of a generation conversation: the text of the last user turn, without the released
    instruction prefix."""
    users = [m for m in messages[:-1] if m["role"] == "user"]
    if not users:
        return ""
    text = " ".join(p["text"] for p in users[-1]["content"] if p["type"] == "text").strip()
    if text.startswith(GENERATION_PREFIX.strip()):
        text = text[len(GENERATION_PREFIX.strip()):].strip()
    return text


def sample_from_messages(
    key: str,
    messages: list[dict],
    images: list[Image.Image],
    target: torch.Tensor | None = None,
) -> Sample:
    """Build the sample for normalized ``messages`` whose placeholders take ``images`` in order.

    For a generation conversation the assistant's placeholder is the target image; it may lack its image when a
    precomputed ``target`` is given. Raises InvalidSample (missing_caption, missing_image, image_count_mismatch).
    """
    wanted = count_placeholders(messages)
    if is_generation(messages):
        caption = generation_caption(messages)
        if not caption:
            raise InvalidSample("missing_caption", key)
        if len(images) == wanted:
            return GenerationSample(key, caption, images[-1], target, list(images[:-1]))
        if len(images) == wanted - 1 and target is not None:
            return GenerationSample(key, caption, None, target, list(images))
        if len(images) == wanted - 1:
            raise InvalidSample("missing_image", key)
        raise InvalidSample("image_count_mismatch", f"{key}: {wanted} placeholders, {len(images)} images")
    if len(images) != wanted:
        raise InvalidSample("image_count_mismatch", f"{key}: {wanted} placeholders, {len(images)} images")
    return UnderstandingSample(key, messages, list(images))
