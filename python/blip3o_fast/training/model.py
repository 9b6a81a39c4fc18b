"""The model under training: loading by source, trainable sets, and the module whose forward gives the losses.

`TrainingModule` is what DDP / FSDP2 wrap. Its forward runs the backbone once over a micro-batch of
generation rows (prompt + [IMG] + the 64 learnable queries, 1-D positions, as BLIP3o._query_states
at inference) and understanding rows (3-D M-RoPE for images), then the generation objective on the
query states and the fused lm_head + CE on the understanding rows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from blip3o_fast.models.blip3o import BLIP3o, BLIP3oNetwork, DiTHolder
from blip3o_fast.models.config import DiTConfig
from blip3o_fast.models.dit import NextDiT
from blip3o_fast.tiny import tiny_model
from blip3o_fast.tokenizer import BLIP3O_ADDED_TOKENS, TokenIds
from blip3o_fast.ops import linear_cross_entropy
from blip3o_fast.training.batches import IGNORE, TrainBatch
from blip3o_fast.training.config import TRAINABLE_SETS
from blip3o_fast.training.objectives import feature_mse_loss, flow_matching_loss

TINY_PREFIX = "tiny:"


def load_model(source: str, seed: int = 0, dit_overrides: dict | None = None, generation: bool = True) -> BLIP3o:
    """A checkpoint folder or tiny:<backbone>. dit_overrides rebuild the DiT, freshly initialised
    from `seed`, with those DiTConfig fields changed (e.g. a VAE-latent DiT). A plain backbone (no
    DiT) gets the generation parts when `generation`: see add_generation_parts."""
    if source.startswith(TINY_PREFIX):
        model = tiny_model(source[len(TINY_PREFIX):], seed=seed)
    else:
        model = BLIP3o.from_pretrained(source)
    if generation and model.config.dit is None:
        add_generation_parts(model, seed, dit_overrides or {})
    elif dit_overrides:
        if model.config.dit is None:
            raise ValueError(f"model.dit_overrides given, but {source} has no DiT to change")
        model.config.dit = _dit_config(model.config.dit, dit_overrides)
        torch.manual_seed(seed)
        model.network.model.dit = DiTHolder(NextDiT(model.config.dit))
    return model


def _dit_config(base: DiTConfig, overrides: dict) -> DiTConfig:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(base)}
    if unknown:
        raise ValueError(f"model.dit_overrides: unknown DiTConfig fields {sorted(unknown)}")
    return dataclasses.replace(base, **overrides)


def add_generation_parts(model: BLIP3o, seed: int, dit_overrides: dict) -> None:
    """What BLIP3-o adds to a plain Qwen2.5-VL / LLaMA 3 backbone before stage-2 training (spec 2.3,
    2.4): the tokens [IMG], [/IMG], <image> (the vocabulary rows must already exist: Qwen2.5-VL's
    matrices are padded beyond its tokenizer), N(0, 1) latent queries, and a DiT (the released sizes
    unless overridden) whose caption projection reads the backbone width."""
    tok = model.tokenizer
    missing = [t for t in BLIP3O_ADDED_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if len(tok) > model.config.text.vocab_size:
        raise ValueError(
            f"the tokenizer needs {len(tok)} rows with BLIP3-o's tokens but the embeddings have "
            f"{model.config.text.vocab_size}: resize the checkpoint's embeddings first"
        )
    model.token_ids = TokenIds.lookup(tok, list(model.token_ids.eos))
    hidden = model.config.text.hidden_size
    model.config.dit = _dit_config(DiTConfig(caption_dim=hidden), dit_overrides)
    device = model.network.model.embed_tokens.weight.device
    torch.manual_seed(seed)
    model.network.model.latent_queries = nn.Parameter(torch.randn(1, model.config.n_query, hidden, device=device))
    model.network.model.dit = DiTHolder(NextDiT(model.config.dit).to(device))


def set_trainable(network: BLIP3oNetwork, trainable: str, generation: str, text: bool = False) -> None:
    """released: the DiT and the queries (backbone and vision tower frozen, spec 1); full: the
    backbone too; language: full but the vision tower frozen, as LLaVA-style training on a pretrained
    vision encoder; dit_only: the DiT alone. Parts the objective never uses stay frozen (the DiT under
    clip_mse; DiT and queries without a generation objective; an untied lm_head without the text
    objective), so every trainable parameter gets a gradient on every step."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE_SETS)}, got {trainable!r}")
    network.requires_grad_(trainable in ("full", "language"))
    if trainable == "language" and network.visual is not None:
        network.visual.requires_grad_(False)
    if not text and network.lm_head.weight is not network.model.embed_tokens.weight:
        network.lm_head.requires_grad_(False)
    has_dit = network.dit is not None
    if has_dit:
        network.dit.requires_grad_(generation in ("clip_flow", "vae_flow"))
    if hasattr(network.model, "latent_queries"):
        network.model.latent_queries.requires_grad_(generation != "none" and trainable != "dit_only")
    elif generation != "none":
        raise ValueError("a generation objective needs a BLIP3o model with latent queries and a DiT")
    if generation in ("clip_flow", "vae_flow") and not has_dit:
        raise ValueError(f"objective {generation} needs a DiT in the model")


def apply_gradient_checkpointing(network: BLIP3oNetwork) -> None:
    """Recompute each decoder layer, vision block and DiT block in the backward (composable
    checkpoint: hooks only, parameter names unchanged, so FSDP2 and the checkpoint layout see no change)."""
    from torch.distributed._composable import checkpoint

    blocks = list(network.model.layers)
    if network.visual is not None:
        blocks += list(network.visual.blocks)
    if network.dit is not None:
        blocks += list(network.dit.layers)
    for block in blocks:
        checkpoint(block)


def tokens_to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side*side, C) tokens, row-major over the grid -> (B, C, side, side)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class TrainingModule(nn.Module):
    def __init__(
        self, network: BLIP3oNetwork, token_ids: TokenIds, generation: str, feature_dim: int | None = None
    ):
        super().__init__()
        self.network = network
        self.token_ids = token_ids
        self.generation = generation
        # CLIP + MSE: a learned linear from the query states to the feature width.
        self.mse_head = None
        if generation == "clip_mse":
            self.mse_head = nn.Linear(network.text_cfg.hidden_size, feature_dim)

    def forward(self, batch: TrainBatch, gen_scale: float, text_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weighted loss to back-propagate, and its two parts detached: the weighted sum of
        per-sample generation losses and the summed token CE. The scales turn those sums into
        global means (see the trainer)."""
        net = self.network
        embeds = net.embed(batch.input_ids, batch.pixel_values, batch.image_grid_thw, image_token_id=self.token_ids.image_pad)
        g = batch.num_gen
        if g:
            # Generation rows end in n_query slots: the learnable queries go there as embeddings.
            queries = net.model.latent_queries
            slots = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
            slots[:g, -queries.shape[1]:] = True
            filled = queries.to(embeds.dtype).expand(g, -1, -1).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(slots[..., None], filled)
        hidden = net.model(embeds, batch.position_ids, batch.attention_mask)
        zero = hidden.new_zeros((), dtype=torch.float32)
        loss, gen_sum, text_sum = zero, zero, zero
        if g:
            per_sample = self.generation_losses(hidden[:g, -net.model.latent_queries.shape[1]:], batch)
            gen_sum = (per_sample * batch.row_weight[:g]).sum()
            loss = loss + gen_sum * gen_scale
        if g < hidden.shape[0]:
            text_sum = self.text_loss(hidden[g:], batch.labels[g:], batch.row_weight[g:])
            loss = loss + text_sum * text_scale
        return loss, gen_sum.detach(), text_sum.detach()

    def generation_losses(self, cond: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Per-sample losses (G,) fp32 from the query states cond (G, n_query, H)."""
        if self.generation == "clip_mse":
            return feature_mse_loss(self.mse_head(cond), batch.targets)
        dit = self.network.dit
        x0, noise = batch.targets, batch.noise
        if x0.dim() == 3:  # CLIP feature tokens -> the DiT's (B, D, 8, 8)
            x0, noise = tokens_to_grid(x0, dit.cfg.sample_size), tokens_to_grid(noise, dit.cfg.sample_size)
        return flow_matching_loss(dit, x0, cond, batch.sigma, batch.keep, noise)

    def text_loss(self, hidden: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
        """Summed next-token CE of the labelled positions, each row weighted (0 for a filler)."""
        targets = labels[:, 1:]
        rows = targets != IGNORE
        h = hidden[:, :-1][rows]
        weight = self.network.lm_head.weight
        per_token = linear_cross_entropy(h, weight.to(h.dtype), targets[rows], reduction="none")
        return (per_token * row_weight[:, None].expand_as(targets)[rows]).sum()
