"""Sampling helpers shared with the Engine, and the simple generation path it is checked beside.

`generate_tokens` is the plain reference decoder: a contiguous KV cache, one left-padded batch, no
scheduling. The model tests use it to hold our backbone to transformers' generate independently of
the paged Engine (engine/engine.py), which is what BLIP3o.generate_text and servers use.
Ragged prompts are left-padded into one batch; one prefill fills the cache, then each decode step
feeds one token per sequence. Positions skip the padding (1-D for LLaMA, 3-D M-RoPE for Qwen), so a
sequence gets the same tokens whatever else is in the batch; sampling draws from one
torch.Generator per request for the same reason.
"""

from __future__ import annotations

import torch
from PIL import Image

from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.models.mrope import decode_positions
from blip3o_fast.models.text_decoder import KVCache


def expand_image_tokens(
    ids: list[int], grid_thws: torch.Tensor | list, image_token_id: int, merge: int = 2
) -> list[int]:
    """Replace the k-th image-pad token of ids by grid_thws[k].prod() // merge^2 copies of it."""
    grids = torch.as_tensor(grid_thws).view(-1, 3).tolist()
    n_pads = sum(1 for x in ids if x == image_token_id)
    if n_pads != len(grids):
        raise ValueError(f"the prompt holds {n_pads} image tokens but {len(grids)} images were given")
    out: list[int] = []
    k = 0
    for x in ids:
        if x == image_token_id:
            t, h, w = grids[k]
            out.extend([image_token_id] * (t * h * w // merge**2))
            k += 1
        else:
            out.append(x)
    return out


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits, then all outside the smallest set of mass >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of fp32 logits (B, V): argmax when temperature == 0."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.no_grad()
def generate_tokens(
    lm: CausalLM,
    prompts: list[list[int]],
    images: list[list] | None,
    *,
    processor=None,
    image_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seeds: list[int | None] | None = None,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> list[list[int]]:
    """Generated ids per prompt (prompt excluded), each stopping before its first eos.

    A prompt with images holds either one image-pad token per image (expanded here) or the already
    expanded run per image. images[i] holds prompt i's PIL images (a list, one image, or [] / None)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_tokens needs at least one prompt, and no prompt may be empty")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    n = len(prompts)
    seeds = list(seeds) if seeds is not None else [None] * n
    if len(seeds) != n or (images is not None and len(images) != n):
        raise ValueError(f"seeds and images must be aligned with the {n} prompts")
    device = lm.lm_head.weight.device
    dtype = lm.lm_head.weight.dtype
    eos = set(eos_token_ids)

    ids, pixel_values, grids = _prepare_prompts(lm, prompts, images, processor, image_token_id)
    width = max(len(p) for p in ids)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    grid_thw = torch.cat(grids) if grids else None
    pixels = torch.cat(pixel_values).to(device) if pixel_values else None

    position_ids, rope_deltas = lm.positions(input_ids, attention_mask, grid_thw, image_token_id, vision_start_token_id)
    embeds = lm.embed(input_ids, pixels, grid_thw, image_token_id)
    cache = KVCache.for_config(lm.text_cfg, n, width + max_new_tokens, dtype=dtype, device=device)
    generators = [_generator(s, device) for s in seeds]
    three_d = lm.text_cfg.arch == "qwen2_5_vl"

    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    hidden = lm.model(embeds, position_ids, attention_mask, cache)
    for step in range(max_new_tokens):
        next_ids = sample_next(lm.logits(hidden[:, -1]), temperature, top_k, top_p, generators)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i] = True
            else:
                out[i].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)
        positions = decode_positions(cache.length, 1, rope_deltas, three_d=three_d)
        hidden = lm.model(lm.model.embed_tokens(next_ids[:, None]), positions, attention_mask, cache)
    return out


def _prepare_prompts(lm: CausalLM, prompts, images, processor, image_token_id):
    """Expand image-pad tokens and preprocess images, request by request in batch order."""
    ids, pixel_values, grids = [], [], []
    for i, prompt in enumerate(prompts):
        imgs = [] if images is None or images[i] is None else images[i]
        imgs = [imgs] if isinstance(imgs, Image.Image) else list(imgs)
        if not imgs:
            ids.append(list(prompt))
            continue
        if lm.visual is None:
            raise ValueError(f"prompt {i} has images but the {lm.text_cfg.arch} backbone has no vision tower")
        if processor is None or image_token_id is None:
            raise ValueError("prompts with images need processor= and image_token_id=")
        pv, grid = processor(imgs)
        merge = lm.vision_cfg.spatial_merge_size
        n_pads = sum(1 for x in prompt if x == image_token_id)
        expanded = int(grid.prod(-1).sum()) // merge**2
        ids.append(list(prompt) if n_pads == expanded else expand_image_tokens(prompt, grid, image_token_id, merge))
        pixel_values.append(pv)
        grids.append(grid)
    return ids, pixel_values, grids
