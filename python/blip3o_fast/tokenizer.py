"""Tokenizer handling: special-token lookup, prompt rendering, and the tiny tokenizer of the embedded model.

Special-token ids are always looked up in the checkpoint's tokenizer (never hard-coded): a real Qwen
tokenizer has [IMG] at 151665, the tiny one at a few hundred.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# BLIP3-o adds these three tokens to the backbone's tokenizer (spec 2.3).
IMG_TOKEN = "[IMG]"
IMG_END_TOKEN = "[/IMG]"
QUERY_TOKEN = "<image>"
BLIP3O_ADDED_TOKENS = (IMG_TOKEN, IMG_END_TOKEN, QUERY_TOKEN)

# Qwen2.5-VL's vision markers.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

GENERATION_INSTRUCTION = "Please generate image based on the following caption: {}"

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_SPECIALS = {
    "qwen2_5_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}

# A fixed corpus: the tiny tokenizer is trained on it, so it is the same on every machine.
_TINY_CORPUS = (
    "a red circle on the left. two blue squares at the top. three green triangles on the right. "
    "a yellow square at the bottom. an orange circle in the centre. purple triangles. "
    "Please generate image based on the following caption: What colour is the shape? "
    "How many objects are there? Where is the circle? Describe the image. You are a helpful assistant. "
    "The quick brown fox jumps over the lazy dog. Hello, world! 0 1 2 3 4 5 6 7 8 9"
)


@dataclass(frozen=True)
class TokenIds:
    """Ids the engine needs, looked up in the tokenizer (None where the tokenizer lacks the token)."""

    img: int | None
    query: int | None
    image_pad: int | None
    vision_start: int | None
    vision_end: int | None
    pad: int
    eos: tuple[int, ...]

    @classmethod
    def lookup(cls, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int] | None = None) -> "TokenIds":
        vocab = tokenizer.get_vocab()

        def find(token: str) -> int | None:
            return vocab.get(token)

        eos = list(eos_ids or [])
        if not eos and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(
            img=find(IMG_TOKEN),
            query=find(QUERY_TOKEN),
            image_pad=find(IMAGE_PAD),
            vision_start=find(VISION_START),
            vision_end=find(VISION_END),
            pad=pad,
            eos=tuple(eos),
        )


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation with the generation prompt, as apply_chat_template tokenizes it
    (the template carries any BOS, so no second one is added)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_message(text: str, num_images: int = 0) -> list[dict[str, Any]]:
    """One user turn, images first (the layout DESIGN.md gives for string prompts)."""
    if num_images == 0:
        return [{"role": "user", "content": text}]
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def build_tiny_tokenizer(backbone: str = "qwen2_5_vl", vocab_size: int = 320,
                         corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (`corpus`, default a built-in paragraph),
    with the backbone's special tokens, chat template and BLIP3-o's three added tokens.
    Deterministic: no download, no randomness."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if backbone not in _SPECIALS:
        raise ValueError(f"backbone must be one of {tuple(_SPECIALS)}, got {backbone!r}")
    specials = _SPECIALS[backbone]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(corpus) if corpus is not None else [_TINY_CORPUS], trainer)
    if backbone == "qwen2_5_vl":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA3_CHAT_TEMPLATE,
        )
    tok.add_tokens(list(BLIP3O_ADDED_TOKENS), special_tokens=True)
    return tok
