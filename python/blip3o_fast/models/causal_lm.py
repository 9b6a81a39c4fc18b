"""The backbone as a causal LM: text decoder, optional Qwen2.5-VL vision tower, LM head.

Attribute names give the transformers 4.51 checkpoint layout: model.* (decoder), visual.* (vision
tower), lm_head.weight (the embedding matrix itself when tie_word_embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

from blip3o_fast.models.config import TextConfig, VisionConfig
from blip3o_fast.models.mrope import rope_index, text_positions
from blip3o_fast.models.qwen_vision import QwenVisionTower
from blip3o_fast.models.text_decoder import KVCache, TextDecoder


class CausalLM(nn.Module):
    def __init__(self, text_cfg: TextConfig, vision_cfg: VisionConfig | None = None) -> None:
        super().__init__()
        if vision_cfg is not None and text_cfg.arch != "qwen2_5_vl":
            raise ValueError(f"a vision tower needs the qwen2_5_vl text decoder, not {text_cfg.arch!r}")
        if vision_cfg is not None and vision_cfg.out_hidden_size != text_cfg.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {vision_cfg.out_hidden_size} != text hidden_size {text_cfg.hidden_size}"
            )
        self.text_cfg = text_cfg
        self.vision_cfg = vision_cfg
        self.model = TextDecoder(text_cfg)
        self.visual = QwenVisionTower(vision_cfg) if vision_cfg is not None else None
        self.lm_head = nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False)
        if text_cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_token_id: int | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, H) with the vision tower's merged features at the image-pad tokens."""
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            n_slots = 0 if image_token_id is None else int((input_ids == image_token_id).sum())
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return embeds
        if self.visual is None:
            raise ValueError(f"images were given to a {self.text_cfg.arch} backbone, which has no vision tower")
        if image_grid_thw is None or image_token_id is None:
            raise ValueError("pixel_values need image_grid_thw and image_token_id")
        features = self.visual(pixel_values, image_grid_thw).to(embeds.dtype)
        slots = input_ids == image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"input_ids hold {int(slots.sum())} image tokens but the images give {features.shape[0]} features "
                f"(expand each image's pad token to grid_thw.prod() // merge^2 copies)"
            )
        return embeds.masked_scatter(slots[..., None], features)

    def positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        image_token_id: int | None,
        vision_start_token_id: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt positions ((3, B, T) for Qwen, (B, T) for LLaMA) and rope_deltas (B,) for decoding."""
        if self.text_cfg.arch == "qwen2_5_vl":
            merge = self.vision_cfg.spatial_merge_size if self.vision_cfg is not None else 2
            return rope_index(input_ids, attention_mask, image_grid_thw, image_token_id, vision_start_token_id, merge)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return text_positions(mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        image_token_id: int | None = None,
        vision_start_token_id: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, H). With inputs_embeds instead of input_ids the positions
        default to 0..T-1 (per row, skipping left padding) unless position_ids are given. With a
        kv_cache, pass the chunk's position_ids (see mrope.decode_positions) and the whole mask."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, image_token_id)
            if position_ids is None:
                position_ids, _ = self.positions(
                    input_ids, attention_mask, image_grid_thw, image_token_id, vision_start_token_id
                )
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot go with inputs_embeds: scatter the image features with embed()")
        if position_ids is None and attention_mask is not None and kv_cache is None:
            position_ids = text_positions(attention_mask)[0]
        return self.model(inputs_embeds, position_ids, attention_mask, kv_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        image_token_id: int | None = None,
        vision_start_token_id: int | None = None,
    ) -> torch.Tensor:
        """fp32 logits (B, T, vocab)."""
        hidden = self.hidden_states(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
            image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
        )
        return self.logits(hidden)
