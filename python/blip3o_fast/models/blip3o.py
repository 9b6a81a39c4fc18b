"""BLIP3-o assembled: backbone + 64 learnable queries + DiT (+ pixel decoder), and the public API.

`BLIP3oNetwork` is the nn.Module whose state dict is the published checkpoint (model.*, visual.*,
lm_head.*, model.latent_queries, model.dit.model.*). `BLIP3o` wraps it with the tokenizer, the image
processor and the pixel decoder, and implements the four tasks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blip3o_fast.checkpoint.config_io import config_from_raw, config_to_raw
from blip3o_fast.checkpoint.safetensors_io import CheckpointError, read_weights, write_weights
from blip3o_fast.checkpoint.state_dict import load_strict, normalize_keys
from blip3o_fast.engine.flow_sampler import sample_features
from blip3o_fast.engine.engine import engine_for_prompts
from blip3o_fast.engine.text_generation import expand_image_tokens
from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.models.config import BLIP3oConfig
from blip3o_fast.models.dit import NextDiT
from blip3o_fast.models.image_processing import QwenImageProcessor
from blip3o_fast.models.pixel_decoder import PixelDecoder
from blip3o_fast.tokenizer import (
    GENERATION_INSTRUCTION,
    TokenIds,
    build_tiny_tokenizer,
    render_chat,
    user_message,
)

DECODER_FOLDER = "diffusion-decoder"
# The released pipeline's negative prompt for the pixel decoder's CFG: a bare space, not templated (spec 2.5).
NEGATIVE_PROMPT = " "
NEGATIVE_SEED = 0


class DiTHolder(nn.Module):
    """Gives the DiT the published key prefix model.dit.model.* (NextDiTCrossAttn wraps the DiT as .model)."""

    def __init__(self, dit: NextDiT):
        super().__init__()
        self.model = dit


class BLIP3oNetwork(CausalLM):
    """Backbone plus, when the config has a DiT, the learnable queries and the DiT inside `model`."""

    def __init__(self, cfg: BLIP3oConfig):
        super().__init__(cfg.text, cfg.vision)
        if cfg.dit is not None:
            self.model.latent_queries = nn.Parameter(torch.randn(1, cfg.n_query, cfg.text.hidden_size))
            self.model.dit = DiTHolder(NextDiT(cfg.dit))

    @property
    def dit(self) -> NextDiT | None:
        holder = getattr(self.model, "dit", None)
        return None if holder is None else holder.model


ImageArg = Image.Image | Sequence[Image.Image]


def _empty_network(config: BLIP3oConfig, device: torch.device | str, dtype: torch.dtype) -> BLIP3oNetwork:
    """A network to load weights into, allocated once in its final device and dtype without paying
    for random initialisation (meta device), unless a module keeps non-persistent buffers, which
    only their constructor can fill."""
    with torch.device("meta"):
        network = BLIP3oNetwork(config)
    persistent = set(network.state_dict())
    if any(name not in persistent for name, _ in network.named_buffers()):
        return BLIP3oNetwork(config).to(device=device, dtype=dtype)
    return network.to(dtype=dtype).to_empty(device=device)


def _check_prompts(name: str, prompts: Sequence[Any]) -> list[Any]:
    if isinstance(prompts, (str, dict)):
        raise TypeError(f"{name} must be a list, got a single {type(prompts).__name__}: wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    return prompts


def _image_list(item: Any, where: str) -> list[Image.Image]:
    images = [] if item is None else ([item] if isinstance(item, Image.Image) else list(item))
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"{where}: images must be PIL.Image.Image, got {type(img).__name__}")
    return images


def _seeds(seed: int | Sequence[int] | None, n: int, default: int = 0) -> list[int]:
    """One seed per request: an int applies to every request, so a request's result does not
    depend on what else is in the batch."""
    if seed is None:
        return [default] * n
    if isinstance(seed, int):
        return [seed] * n
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return seeds


def _load_pixel_decoder(folder: Path, device, dtype):
    """diffusion-decoder/: the diffusers UNet + VAE of the release, or the tiny shapes model's feature
    flow decoder (same decode interface; imported only when a checkpoint has one)."""
    from blip3o_fast.shapes.pixel_diffusion import FeatureFlowDecoder, is_feature_flow_decoder

    if is_feature_flow_decoder(folder):
        return FeatureFlowDecoder.from_pretrained(folder, device=device, dtype=dtype)
    return PixelDecoder.from_pretrained(folder, device=device, dtype=dtype)


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """tokenizer.json loads directly (AutoTokenizer would consult config.json, whose blip3o model types
    transformers does not know); other tokenizers go through AutoTokenizer."""
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


class BLIP3o:
    def __init__(
        self,
        config: BLIP3oConfig,
        network: BLIP3oNetwork,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: QwenImageProcessor | None = None,
        pixel_decoder: PixelDecoder | None = None,
        generation_config: dict[str, Any] | None = None,
    ):
        self.config = config
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.pixel_decoder = pixel_decoder
        self.generation_config = dict(generation_config or {})
        eos = self.generation_config.get("eos_token_id")
        self.token_ids = TokenIds.lookup(tokenizer, [eos] if isinstance(eos, int) else eos)
        if len(tokenizer) > config.text.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.text.vocab_size} rows"
            )
        self._negative_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_config(
        cls, config: BLIP3oConfig, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> "BLIP3o":
        """Random weights from a fixed seed; without a tokenizer, the deterministic tiny one is built."""
        tokenizer = tokenizer or build_tiny_tokenizer(config.backbone)
        torch.manual_seed(seed)
        network = BLIP3oNetwork(config)
        processor = QwenImageProcessor() if config.vision is not None else None
        decoder = PixelDecoder.from_config(config.decoder, seed=seed) if config.decoder is not None else None
        return cls(config, network, tokenizer, processor, decoder)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "BLIP3o":
        """A published BLIP3o folder, a plain transformers LLaMA 3 / Qwen2.5-VL folder, or the name of a
        checkpoint shipped with the package (blip3o_fast.weights.SHIPPED: "tiny-shapes")."""
        from blip3o_fast.weights import SHIPPED, shipped_folder

        folder = Path(path)
        if not folder.is_dir():
            shipped = shipped_folder(str(path))
            if shipped is None:
                raise FileNotFoundError(
                    f"checkpoint folder not found: {folder} (shipped checkpoints: {', '.join(SHIPPED)})"
                )
            folder = shipped
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        state = normalize_keys(read_weights(folder))
        config = config_from_raw(raw, state)
        decoder = None
        if (folder / DECODER_FOLDER).is_dir():
            decoder = _load_pixel_decoder(folder / DECODER_FOLDER, device, dtype)
            config.decoder = decoder.cfg
        network = _empty_network(config, device, dtype)
        tied = ("lm_head.weight",) if config.text.tie_word_embeddings else ()
        load_strict(network, state, str(folder), optional=tied)
        if config.text.tie_word_embeddings:
            network.lm_head.weight = network.model.embed_tokens.weight
        if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {folder}")
        tokenizer = _load_tokenizer(folder)
        processor = None
        if config.vision is not None:
            processor = (
                QwenImageProcessor.from_pretrained(folder)
                if (folder / "preprocessor_config.json").is_file()
                else QwenImageProcessor()
            )
        gen_file = folder / "generation_config.json"
        generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls(config, network, tokenizer, processor, decoder, generation_config)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the published layout: config.json, safetensors, tokenizer, generation config,
        preprocessor config (Qwen) and diffusion-decoder/ (when there is a pixel decoder).
        state_dict: the network's weights to write instead of its own (a trainer gathers them from
        a sharded network)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        ids = self.token_ids
        token_fields = {
            "image_token_id": ids.image_pad,
            "vision_start_token_id": ids.vision_start,
            "vision_end_token_id": ids.vision_end,
            "img_token_id": ids.img,
            "pad_token_id": ids.pad,
            "eos_token_id": list(ids.eos),
        }
        (folder / "config.json").write_text(json.dumps(config_to_raw(self.config, token_fields), indent=2))
        state = dict(state_dict) if state_dict is not None else self.network.state_dict()
        if self.config.text.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        write_weights(state, folder)
        self.tokenizer.save_pretrained(str(folder))
        generation = {**self.generation_config, "eos_token_id": list(ids.eos), "pad_token_id": ids.pad}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)
        if self.pixel_decoder is not None:
            self.pixel_decoder.save_pretrained(folder / DECODER_FOLDER)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "BLIP3o":
        self.network.to(device=device, dtype=dtype)
        if self.pixel_decoder is not None:
            self.pixel_decoder.to(device=device, dtype=dtype)
        self._negative_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.network.model.embed_tokens.weight.device

    # ------------------------------------------------------------------ shared pieces
    def _require_dit(self) -> NextDiT:
        dit = self.network.dit
        if dit is None or self.token_ids.img is None:
            raise ValueError(
                "this model has no DiT (or its tokenizer lacks [IMG]): image generation needs a BLIP3o checkpoint, "
                "not a plain backbone"
            )
        return dit

    def _images_for(self, images: Sequence[Any] | None, n: int, what: str) -> list[list[Image.Image]]:
        if images is None:
            return [[] for _ in range(n)]
        if isinstance(images, Image.Image):
            raise TypeError(f"{what}: images must be a list aligned with the prompts, got a single PIL image")
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"{what}: images must be a list aligned with the prompts, got {type(images).__name__}")
        if len(images) != n:
            raise ValueError(f"{what}: got {len(images)} image entries for {n} prompts")
        per_prompt = [_image_list(item, what) for item in images]
        if any(per_prompt) and self.network.visual is None:
            raise ValueError(
                f"{what}: this {self.config.backbone} backbone has no vision tower, so it cannot take images "
                "(use a Qwen2.5-VL backbone)"
            )
        return per_prompt

    def _pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not images:
            return None, None
        pixel_values, grid_thw = self.image_processor(images)
        return pixel_values.to(self.device, self.network.model.embed_tokens.weight.dtype), grid_thw.to(self.device)

    def _expand(self, ids: list[int], grid_thw: torch.Tensor | None) -> list[int]:
        if grid_thw is None:
            return ids
        return expand_image_tokens(ids, grid_thw, self.token_ids.image_pad, self.config.vision.spatial_merge_size)

    @torch.no_grad()
    def _query_states(self, prompt_ids: list[list[int]], images: list[list[Image.Image]]) -> torch.Tensor:
        """Final-norm hidden states at the 64 query positions for each prompt + [IMG] + queries (spec 2.4).

        Prompts are left-padded so every sequence ends in its queries; positions are 1-D (0 at each
        prompt's first token) on every M-RoPE axis, as the released model computes them."""
        net = self.network
        queries = net.model.latent_queries
        n_query = queries.shape[1]
        embeds, lengths = [], []
        for ids, imgs in zip(prompt_ids, images):
            pixel_values, grid_thw = self._pixels(imgs)
            full = self._expand(ids, grid_thw) + [self.token_ids.img]
            input_ids = torch.tensor([full], device=self.device)
            e = net.embed(input_ids, pixel_values, grid_thw, image_token_id=self.token_ids.image_pad)
            embeds.append(torch.cat([e, queries.to(e.dtype)], dim=1)[0])
            lengths.append(len(full) + n_query)
        total = max(lengths)
        batch = torch.zeros(len(embeds), total, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
        mask = torch.zeros(len(embeds), total, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            batch[i, total - e.shape[0]:] = e
            mask[i, total - e.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.config.backbone == "qwen2_5_vl":
            positions = positions[None].expand(3, -1, -1)
        hidden = net.hidden_states(inputs_embeds=batch, position_ids=positions, attention_mask=mask)
        return hidden[:, -n_query:]

    def resolve_guidance(self, scale: float | None) -> float:
        """A call's CFG scale, or the checkpoint's default (config.guidance_scale) when it gives none."""
        return self.config.guidance_scale if scale is None else float(scale)

    def _features(
        self,
        prompt_ids: list[list[int]],
        images: list[list[Image.Image]],
        num_steps: int,
        guidance_scale: float,
        seeds: list[int],
        noise: torch.Tensor | None,
        reference_exact: bool,
        solver: str = "euler",
    ) -> torch.Tensor:
        dit = self._require_dit()
        if noise is not None:
            d = self.config.dit
            expected = (len(prompt_ids), d.sample_size * d.sample_size, d.in_channels)
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise must have shape {expected} (B, tokens, feature dim), got {tuple(noise.shape)}")
        cond = self._query_states(prompt_ids, images)
        return sample_features(
            dit,
            cond,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            shift=self.config.flow_shift,
            num_train_timesteps=self.config.num_train_timesteps,
            noise=noise,
            seeds=seeds,
            reference_exact=reference_exact,
            solver=solver,
        )

    def _generation_ids(self, caption: str, num_images: int = 0) -> list[int]:
        return render_chat(self.tokenizer, user_message(GENERATION_INSTRUCTION.format(caption), num_images))

    def _negative_features(self, num_steps: int, guidance_scale: float) -> torch.Tensor:
        """Features of the bare-space prompt for the decoder's CFG; computed once per setting and
        cached, as the released pipeline does, with a fixed seed so results are reproducible."""
        key = (num_steps, guidance_scale)
        if key not in self._negative_cache:
            ids = self.tokenizer(NEGATIVE_PROMPT, add_special_tokens=False)["input_ids"]
            self._negative_cache[key] = self._features(
                [ids], [[]], num_steps, guidance_scale, [NEGATIVE_SEED], None, False
            )
        return self._negative_cache[key]

    def decode_features(
        self,
        features: torch.Tensor,
        num_steps: int = 30,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] | None = 0,
    ) -> list[Image.Image]:
        """CLIP features (B, 64, D) -> images through the pixel decoder, with the bare-space prompt's
        features (sampled with the same DiT settings) as the negative of its CFG."""
        seeds = _seeds(seed, features.shape[0])
        if self.pixel_decoder is None:
            raise ValueError(f"this model has no pixel decoder: the checkpoint needs a {DECODER_FOLDER}/ folder")
        negative = self._negative_features(num_steps, self.resolve_guidance(guidance_scale))
        return self.pixel_decoder.decode(
            features,
            negative,
            num_steps=self.config.decoder.num_inference_steps,
            guidance_scale=self.config.decoder.guidance_scale,
            seeds=seeds,
        )

    # ------------------------------------------------------------------ the four tasks
    def generate_image_features(
        self,
        prompts: Sequence[str],
        num_steps: int = 30,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] | None = 0,
        noise: torch.Tensor | None = None,
        reference_exact: bool = False,
        solver: str = "euler",
    ) -> torch.Tensor:
        """CLIP features (B, 64, D) for captions: one backbone prefill, then the flow-matching sampler.
        solver: euler (reference_exact reproduces the release) | heun | multistep (Adams-Bashforth in
        sigma, for few steps). guidance_scale None: the checkpoint's (config.guidance_scale)."""
        prompts = _check_prompts("prompts", prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        ids = [self._generation_ids(p) for p in prompts]
        guidance = self.resolve_guidance(guidance_scale)
        return self._features(
            ids, [[] for _ in prompts], num_steps, guidance, _seeds(seed, len(prompts)), noise, reference_exact, solver,
        )

    def generate_image(
        self,
        prompts: Sequence[str],
        num_steps: int = 30,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] | None = 0,
        solver: str = "euler",
    ) -> list[Image.Image]:
        seeds = _seeds(seed, len(_check_prompts("prompts", prompts)))
        guidance = self.resolve_guidance(guidance_scale)
        features = self.generate_image_features(prompts, num_steps, guidance, seeds, solver=solver)
        return self.decode_features(features, num_steps, guidance, seeds)

    def edit_image(
        self,
        images: Sequence[ImageArg],
        instructions: Sequence[str],
        num_steps: int = 30,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] | None = 0,
    ) -> list[Image.Image]:
        """Image(s) + instruction -> image: the inputs pass through the vision tower into the prompt
        before [IMG] + queries (spec 1, I2I). Each entry of `images` is one image or a list of them."""
        instructions = _check_prompts("instructions", instructions)
        per_prompt = self._images_for(list(images) if isinstance(images, (list, tuple)) else images,
                                      len(instructions), "edit_image")
        if not all(per_prompt):
            raise ValueError("edit_image: every instruction needs at least one input image")
        seeds = _seeds(seed, len(instructions))
        ids = [render_chat(self.tokenizer, user_message(text, len(imgs))) for text, imgs in zip(instructions, per_prompt)]
        guidance = self.resolve_guidance(guidance_scale)
        features = self._features(ids, per_prompt, num_steps, guidance, seeds, None, False)
        return self.decode_features(features, num_steps, guidance, seeds)

    def generate_text(
        self,
        prompts: Sequence[str | list[dict[str, Any]]],
        images: Sequence[Any] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | Sequence[int] | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[str]:
        """Chat completion for each prompt (a string: one user turn, images first; or a transformers-style
        conversation whose image parts take the prompt's images in order). Returns the new text only."""
        prompts = _check_prompts("prompts", prompts)
        per_prompt = self._images_for(images, len(prompts), "generate_text")
        ids = []
        for prompt, imgs in zip(prompts, per_prompt):
            if isinstance(prompt, str):
                messages = user_message(prompt, len(imgs))
            elif isinstance(prompt, list):
                messages = prompt
                slots = sum(
                    1 for m in messages if isinstance(m.get("content"), list)
                    for part in m["content"] if part.get("type") == "image"
                )
                if slots != len(imgs):
                    raise ValueError(f"generate_text: a conversation has {slots} image parts but {len(imgs)} images")
            else:
                raise TypeError(f"prompts must be strings or chat message lists, got {type(prompt).__name__}")
            ids.append(render_chat(self.tokenizer, messages))
        if temperature > 0:
            top_p = top_p if top_p is not None else self.generation_config.get("top_p")
            top_k = top_k if top_k is not None else self.generation_config.get("top_k")
        engine = engine_for_prompts(self, ids, per_prompt, max_new_tokens)
        seeds = [None] * len(ids) if seed is None else _seeds(seed, len(ids))
        outputs = engine.generate([
            dict(prompt=p, images=imgs, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=s, stop=stop)
            for p, imgs, s in zip(ids, per_prompt, seeds)
        ])
        return [o.text for o in outputs]

