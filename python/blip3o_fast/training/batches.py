"""Samples -> token ids, labels and pixel inputs, then padded batches.

Generation (spec 2.5): the caption in the generation instruction as one user turn, rendered by the
tokenizer's chat template; with `prompt = "train"` the assistant turn is closed empty before [IMG]
(the released training prompt), with "inference" it is left open as generate_image_features does.
Then [IMG]; the 64 queries are appended as embeddings by the model. Source images (editing) go
through the vision tower into the user turn, the caption then being the instruction itself.
Generation rows are left-padded, so every row ends in its queries.

Understanding: the conversation rendered by the chat template; labels (next-token targets) only on
assistant content and its end-of-turn token, found by rendering each assistant turn's prefix; image
placeholders expanded to one pad token per merged patch. Right-padded, labels -100 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip3o_fast.data.samples import GenerationSample, InvalidSample, UnderstandingSample
from blip3o_fast.models.image_processing import QwenImageProcessor
from blip3o_fast.models.mrope import rope_index, text_positions
from blip3o_fast.tokenizer import GENERATION_INSTRUCTION, TokenIds, user_message

IGNORE = -100


@dataclass
class EncodedGeneration:
    key: str
    ids: list[int]  # prompt + [IMG]
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None
    target_pixels: torch.Tensor | None  # the target image preprocessed for the target tower (online targets)
    target: torch.Tensor | None  # precomputed target


@dataclass
class EncodedUnderstanding:
    key: str
    ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None


@dataclass
class TrainBatch:
    """One micro-batch: generation rows first (left-padded: prompt, [IMG], then n_query slots that
    the model fills with the learnable queries), then understanding rows (right-padded). One backbone
    pass serves both. row_weight is 1 for real rows and 0 for the fillers that keep every branch of a
    multitask step running on every rank (see Collator)."""

    keys: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (3, B, T) for Qwen2.5-VL, (B, T) for LLaMA
    labels: torch.Tensor  # (B, T), IGNORE on generation rows, prompts and padding
    row_weight: torch.Tensor  # (B,) fp32
    num_gen: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    target_pixels: torch.Tensor | None = None  # (num_gen, 3, S, S) for a target tower (online targets)
    # Filled before the step: x0 for the DiT or the MSE head (num_gen, ...) and each sample's flow draws.
    targets: torch.Tensor | None = None
    sigma: torch.Tensor | None = None  # (num_gen,) fp32
    keep: torch.Tensor | None = None  # (num_gen,) bool: False drops the conditioning
    noise: torch.Tensor | None = None  # like targets

    @property
    def gen_count(self) -> float:
        return float(self.row_weight[: self.num_gen].sum())

    @property
    def text_count(self) -> float:
        """Labelled next-token positions of real rows (what the CE sums over)."""
        labelled = (self.labels[:, 1:] != IGNORE).float().sum(1)
        return float((labelled * self.row_weight).sum())


def batch_to(batch, device: torch.device):
    """A copy of a batch with its tensors on device."""
    values = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        values[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
    return type(batch)(**values)


def _images(processor: QwenImageProcessor | None, images: list[Image.Image], key: str):
    if not images:
        return None, None
    if processor is None:
        raise InvalidSample("images_without_vision_tower", key)
    try:
        return processor(images)
    except (OSError, ValueError, SyntaxError) as exc:  # lazily decoded images fail here
        raise InvalidSample("corrupt_image", f"{key}: {exc}") from exc


class SampleEncoder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: TokenIds,
        image_processor: QwenImageProcessor | None,
        n_query: int,
        max_length: int,
        generation_prompt: str = "train",
        merge_size: int = 2,
        target_preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        """target_preprocess: the target tower's image preprocessing, for targets computed online
        (None: targets are precomputed, read from sample.target)."""
        self.tokenizer = tokenizer
        self.ids = token_ids
        self.processor = image_processor
        self.n_query = n_query
        self.max_length = max_length
        self.generation_prompt = generation_prompt
        self.merge = merge_size
        self.target_preprocess = target_preprocess

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def expand(self, ids: list[int], labels: list[int], grid_thw: torch.Tensor | None) -> tuple[list[int], list[int]]:
        """Each image-pad token becomes grid.prod() // merge^2 pads (as engine.text_generation's
        expand_image_tokens), unlabelled."""
        if grid_thw is None:
            return ids, labels
        grids = grid_thw.view(-1, 3).tolist()
        if sum(1 for x in ids if x == self.ids.image_pad) != len(grids):
            raise InvalidSample("image_count_mismatch", "image placeholders and images disagree")
        out_ids, out_labels, k = [], [], 0
        for tok, lab in zip(ids, labels):
            if tok == self.ids.image_pad:
                t, h, w = grids[k]
                n = t * h * w // self.merge**2
                out_ids.extend([tok] * n)
                out_labels.extend([IGNORE] * n)
                k += 1
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def generation(self, sample: GenerationSample) -> EncodedGeneration:
        if self.ids.img is None:
            raise ValueError("the tokenizer has no [IMG] token: generation training needs a BLIP3o tokenizer")
        sources = list(sample.source_images)
        text = sample.caption if sources else GENERATION_INSTRUCTION.format(sample.caption)
        messages = user_message(text, len(sources))
        if self.generation_prompt == "train":
            messages = messages + [{"role": "assistant", "content": ""}]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=self.generation_prompt != "train"
        )
        ids = self._tokens(rendered)
        pixel_values, grid_thw = _images(self.processor, sources, sample.key)
        ids, _ = self.expand(ids, [IGNORE] * len(ids), grid_thw)
        room = self.max_length - self.n_query - 1
        if len(ids) > room:
            if sources:
                raise InvalidSample("too_long", f"{sample.key}: {len(ids)} prompt tokens with images > {room}")
            ids = ids[:room]  # the release truncates the text, then appends [IMG] + queries
        target_pixels, target = None, sample.target
        if self.target_preprocess is None:
            if target is None:
                raise InvalidSample("missing_target", f"{sample.key}: no precomputed target")
        else:
            if sample.image is None:
                raise InvalidSample("missing_image", f"{sample.key}: no target image to encode")
            try:
                target_pixels = self.target_preprocess(sample.image)
            except (OSError, ValueError, SyntaxError) as exc:
                raise InvalidSample("corrupt_image", f"{sample.key}: {exc}") from exc
        return EncodedGeneration(sample.key, ids + [self.ids.img], pixel_values, grid_thw, target_pixels, target)

    def understanding(self, sample: UnderstandingSample) -> EncodedUnderstanding:
        messages = sample.messages
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            end = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not full.startswith(end) or not end.startswith(start):  # e.g. an assistant turn first
                raise InvalidSample("bad_conversation", f"{sample.key}: the chat template does not render turn {i} "
                                    "as a prefix of the conversation, so its assistant tokens cannot be found")
            spans.append((len(start), len(end)))
        if not spans:
            raise InvalidSample("no_assistant_turn", sample.key)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(a <= s < b for a, b in spans) else IGNORE
            for tok, (s, _) in zip(ids, enc["offset_mapping"])
        ]
        pixel_values, grid_thw = _images(self.processor, list(sample.images), sample.key)
        ids, labels = self.expand(ids, labels, grid_thw)
        if len(ids) > self.max_length:
            if grid_thw is not None:
                raise InvalidSample("too_long", f"{sample.key}: {len(ids)} tokens with images > {self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(lab == IGNORE for lab in labels[1:]):
            raise InvalidSample("no_assistant_turn", f"{sample.key}: nothing left to learn after truncation")
        return EncodedUnderstanding(sample.key, ids, labels, pixel_values, grid_thw)


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


class Collator:
    """Encoded samples -> TrainBatch, with positions as the model wants them: 1-D over prompt and
    queries for generation rows (the release bypasses M-RoPE there, also with input images), 3-D
    M-RoPE from the token ids for understanding rows of a Qwen2.5-VL backbone.

    Fillers: DDP and FSDP2 need every rank to use the same trainable parameters (and FSDP2 to run
    the same shard groups) at every step, whatever its micro-batch holds. So when a micro-batch lacks
    a kind of row that `fillers` names ("generation", "understanding": multitask), or lacks an image
    while `image_filler` is set (a trainable vision tower), a zero-weight filler row is added; the
    zero weight keeps losses and gradients exact."""

    def __init__(self, encoder: SampleEncoder, mrope: bool, fillers: tuple[str, ...] = (), target_shape=None,
                 image_filler: bool = False):
        self.encoder = encoder
        self.mrope = mrope
        self.fillers = fillers
        self.target_shape = target_shape  # of a precomputed target, for the generation filler
        self.image_filler = image_filler

    def _filler_generation(self) -> EncodedGeneration:
        enc = self.encoder
        pixels = target = None
        if enc.target_preprocess is not None:
            pixels = enc.target_preprocess(Image.new("RGB", (64, 64)))
        else:
            target = torch.zeros(self.target_shape)
        return EncodedGeneration("<filler>", [enc.ids.img], None, None, pixels, target)

    def _filler_understanding(self, with_image: bool) -> EncodedUnderstanding:
        ids = self.encoder.ids
        eos = ids.eos[0] if ids.eos else ids.pad
        tokens, pixel_values, grid_thw = [ids.pad, eos], None, None
        if with_image:
            pixel_values, grid_thw = self.encoder.processor([Image.new("RGB", (56, 56))])
            tokens = [ids.vision_start, ids.image_pad, ids.vision_end] + tokens
        labels = [IGNORE] * (len(tokens) - 1) + [eos]
        tokens, labels = self.encoder.expand(tokens, labels, grid_thw)
        return EncodedUnderstanding("<filler>", tokens, labels, pixel_values, grid_thw)

    def __call__(self, items: list[EncodedGeneration | EncodedUnderstanding]) -> TrainBatch:
        gen = [e for e in items if isinstance(e, EncodedGeneration)]
        und = [e for e in items if isinstance(e, EncodedUnderstanding)]
        weights = [1.0] * len(gen)
        if not gen and "generation" in self.fillers:
            gen, weights = [self._filler_generation()], [0.0]
        und_weights = [1.0] * len(und)
        needs_image = self.image_filler and all(e.pixel_values is None for e in gen + und)
        if needs_image or (not und and "understanding" in self.fillers):
            und, und_weights = und + [self._filler_understanding(needs_image)], und_weights + [0.0]
        n_query, pad = self.encoder.n_query, self.encoder.ids.pad
        rows = [e.ids + [pad] * n_query for e in gen] + [e.ids for e in und]
        b, total = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, total), pad, dtype=torch.long)
        labels = torch.full((b, total), IGNORE, dtype=torch.long)
        mask = torch.zeros(b, total, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(total - len(row), total) if i < len(gen) else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
            if i >= len(gen):
                labels[i, span] = torch.tensor(und[i - len(gen)].labels)
        positions = self._positions(ids, mask, len(gen), und)
        pixel_values = _cat([e.pixel_values for e in gen] + [e.pixel_values for e in und])
        grid_thw = _cat([e.grid_thw for e in gen] + [e.grid_thw for e in und])
        target_pixels = targets = None
        if gen and all(e.target is not None for e in gen):
            targets = torch.stack([e.target.float() for e in gen])
        if gen and all(e.target_pixels is not None for e in gen):
            target_pixels = torch.stack([e.target_pixels for e in gen])
        return TrainBatch(
            [e.key for e in gen] + [e.key for e in und], ids, mask, positions, labels,
            torch.tensor(weights + und_weights, dtype=torch.float32), len(gen), pixel_values, grid_thw,
            target_pixels, targets,
        )

    def _positions(self, ids, mask, num_gen, und) -> torch.Tensor:
        pos = text_positions(mask)[0]
        if not self.mrope:
            return pos
        pos = pos[None].repeat(3, 1, 1)
        if und:
            enc = self.encoder
            grid_thw = _cat([e.grid_thw for e in und])
            pos[:, num_gen:] = rope_index(
                ids[num_gen:], mask[num_gen:], grid_thw, enc.ids.image_pad, enc.ids.vision_start, enc.merge
            )[0]
        return pos
