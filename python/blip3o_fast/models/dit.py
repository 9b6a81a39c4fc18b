"""BLIP3-o's diffusion transformer: Lumina-Next DiT with a caption projection (spec section 3).

Parameter names equal the published checkpoint's keys below `model.dit.model.` (and diffusers'
LuminaNextDiT2DModel's, whose upstream `pad_token` BLIP3-o removed), so weights load by name.

The context is fixed for a whole sampling run, so everything derived from it alone (projected
caption, pooled caption embedding, every layer's cross-attention K/V with norm_k applied) is built
once by `precompute_condition`, and `modulations` builds the adaLN terms of a whole schedule;
`forward_with_condition` then runs one denoising step.

A block is two GEMM groups around fused ops: ops.dit_attention does LayerNorm-across-heads, 2-D
RoPE, attention (GQA without expanding K/V) and, for cross-attention, the tanh gate plus the self
output as residual; ops.gated_residual_norm does each epilogue x += gate * RMSNorm(y) * w together
with the adaLN norm that reads the new x (ffn_norm1 with scale_mlp after attention; the next
layer's norm1 with its scale_msa after the FFN), so every RMSNorm of the residual stream but the
first is fused into the op before it. All of it has a backward: `forward` is the training path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o_fast.models.config import DiTConfig
from blip3o_fast.ops import dit_attention, gated_residual_norm, lumina_2d_cos_sin, rms_norm, rms_norm_modulate, swiglu

TIME_FREQ_DIM = 256  # sinusoidal timestep features, as Lumina-Next's Timesteps(256)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RMSNormZero(nn.Module):
    """adaLN without shift: `linear` maps SiLU(temb) to (scale_msa, gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, temb_dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(temb_dim, 4 * dim)
        self.norm = RMSNorm(dim, eps)


class CaptionProjection(nn.Module):
    """Backbone hidden states -> DiT width: Linear + GELU(tanh) + Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQ_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class TimeCaptionEmbed(nn.Module):
    def __init__(self, dim: int, temb_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(temb_dim)
        self.caption_embedder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, temb_dim))


class PatchEmbedder(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(patch * patch * in_channels, dim)


class Attention(nn.Module):
    """Projections of one Lumina attention; LayerNorm over all heads at once on q and k."""

    def __init__(self, dim: int, kv_in_dim: int, heads: int, kv_heads: int, out_proj: bool):
        super().__init__()
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(kv_in_dim, kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(kv_in_dim, kv_heads * head_dim, bias=False)
        self.norm_q = nn.LayerNorm(heads * head_dim, eps=1e-5)
        self.norm_k = nn.LayerNorm(kv_heads * head_dim, eps=1e-5)
        if out_proj:
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim, bias=False)])


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(swiglu(self.linear_1(x), self.linear_3(x)))


class FinalNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-6) scaled by 1 + linear_1(SiLU(temb)), then linear_2 to the output."""

    def __init__(self, dim: int, temb_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(temb_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale: linear_1(SiLU(temb)), (B, dim)."""
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None, :])
        return self.linear_2(x)


class NextDiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, cfg.head_dim, cfg.norm_eps
        self.gate = nn.Parameter(torch.zeros(heads))
        self.attn1 = Attention(dim, dim, heads, kv_heads, out_proj=False)
        self.attn2 = Attention(dim, dim, heads, kv_heads, out_proj=True)
        self.feed_forward = FeedForward(dim, cfg.ffn_hidden_size)
        self.norm1 = RMSNormZero(dim, cfg.time_embed_dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.norm1_context = RMSNorm(dim, cfg.norm_eps)

    def cross_kv(self, caption: torch.Tensor, normalize_k: bool) -> torch.Tensor:
        """Cross-attention K (no RoPE; after norm_k when normalize_k) and V: (2, B, L, kv_heads, head_dim)."""
        b, n, _ = caption.shape
        c = self.norm1_context(caption)
        k = self.attn2.to_k(c)
        if normalize_k:
            k = self.attn2.norm_k(k)
        return torch.stack([k, self.attn2.to_v(c)]).view(2, b, n, self.kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        mod: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cross_kv: torch.Tensor,
        cond: DiTCondition,
        next_norm: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: the residual stream (B, T, dim); h = RMSNorm(x) * norm1.weight * (1 + scale_msa), which
        the previous layer's epilogue (or the model, for the first layer) already computed.
        mod: this layer's (scale_msa, tanh(gate_msa), scale_mlp, tanh(gate_mlp)) as (4, B, dim).
        next_norm: the next layer's (norm1 weight, scale_msa), so this layer's last epilogue also
        builds the next layer's h; None for the last layer. Returns (x, next h or None)."""
        b, t, _ = x.shape
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        _, gate_msa, scale_mlp, gate_mlp = mod.unbind(0)

        a1 = self.attn1
        self_out = dit_attention(
            a1.to_q(h).view(b, t, hq, d), a1.to_k(h).view(b, t, hkv, d), a1.to_v(h).view(b, t, hkv, d),
            a1.norm_q.weight, a1.norm_q.bias, a1.norm_k.weight, a1.norm_k.bias, cos, sin, rope_k=True,
        )
        # Cross-attention: keys of the context get no RoPE; the self output rides in as the residual,
        # so the op returns self_out + tanh(gate) * cross_out. Hoisted keys are already normalised.
        a2 = self.attn2
        k_weight, k_bias = (None, None) if cond.k_normed else (a2.norm_k.weight, a2.norm_k.bias)
        ck, cv = cross_kv.unbind(0)
        mixed = dit_attention(
            a2.to_q(h).view(b, t, hq, d), ck, cv, a2.norm_q.weight, a2.norm_q.bias, k_weight, k_bias, cos, sin,
            key_mask=cond.key_mask, gate=self.gate, residual=self_out, rope_k=False,
        )
        out = a2.to_out[0](mixed.reshape(b, t, hq * d))
        x, h = gated_residual_norm(x, out, self.norm2.weight, gate_msa, self.ffn_norm1.weight, scale_mlp, self.eps)
        ff = self.feed_forward(h)
        if next_norm is None:
            return gated_residual_norm(x, ff, self.ffn_norm2.weight, gate_mlp, eps=self.eps), None
        return gated_residual_norm(x, ff, self.ffn_norm2.weight, gate_mlp, *next_norm, self.eps)


@dataclass
class DiTCondition:
    """What a sampling run reuses every step: derived from the context alone."""

    caption: torch.Tensor  # (B, L, hidden): the context after caption_projection
    caption_emb: torch.Tensor  # (B, temb_dim): embedding of the (masked) mean caption token
    cross_kv: torch.Tensor  # (layers, 2, B, L, kv_heads, head_dim): every layer's cross-attention K, V
    key_mask: torch.Tensor | None  # (B, L) bool, None when every context token is valid
    k_normed: bool  # K already went through norm_k (hoisted), else the attention op applies it

    @property
    def batch_size(self) -> int:
        return self.caption.shape[0]


@dataclass
class DiTModulation:
    """The adaLN terms of one timestep per sample."""

    layers: torch.Tensor  # (layers, 4, B, dim): scale_msa, tanh(gate_msa), scale_mlp, tanh(gate_mlp)
    final_scale: torch.Tensor  # (B, dim)


@dataclass
class DiTSchedule:
    """The adaLN terms of S timesteps, stacked. They depend only on the timestep and the condition,
    so a sampler computes those of its whole schedule at once (one GEMM per layer, not one per
    step); indexing gives one step's terms as views, at fixed addresses."""

    layers: torch.Tensor  # (S, layers, 4, B, dim)
    final_scale: torch.Tensor  # (S, B, dim)

    def __len__(self) -> int:
        return self.layers.shape[0]

    def __getitem__(self, i: int) -> DiTModulation:
        return DiTModulation(self.layers[i], self.final_scale[i])


def timestep_features(timestep: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of float timesteps (B,) -> (B, dim) fp32 (shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class NextDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ValueError(
                f"DiT hidden_size {cfg.hidden_size} must split into {cfg.num_attention_heads} heads "
                "whose size is a multiple of 4 (2-D RoPE)"
            )
        if cfg.num_attention_heads % cfg.num_kv_heads:
            raise ValueError(
                f"DiT num_attention_heads {cfg.num_attention_heads} must be a multiple of num_kv_heads {cfg.num_kv_heads}"
            )
        self.cfg = cfg
        dim, temb_dim, p = cfg.hidden_size, cfg.time_embed_dim, cfg.patch_size
        self.caption_projection = CaptionProjection(cfg.caption_dim, dim)
        self.patch_embedder = PatchEmbedder(p, cfg.in_channels, dim)
        self.time_caption_embed = TimeCaptionEmbed(dim, temb_dim)
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FinalNorm(dim, temb_dim, p * p * cfg.in_channels)
        # (h_tokens, w_tokens, batch, device) -> (cos, sin); derived data, kept out of the state dict.
        self._rope_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, h_tokens: int, w_tokens: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (batch, h*w, head_dim/2) fp32, built once per grid, batch and device (the
        attention kernels read one row per sample, so the batch copy is made here, not per layer)."""
        key = (h_tokens, w_tokens, batch, torch.device(device))
        if key not in self._rope_cache:
            cos, sin = lumina_2d_cos_sin(h_tokens, w_tokens, self.cfg.head_dim, self.cfg.rope_theta)
            self._rope_cache[key] = tuple(t.expand(batch, -1, -1).contiguous().to(device) for t in (cos, sin))
        return self._rope_cache[key]

    def precompute_condition(
        self, context: torch.Tensor, context_mask: torch.Tensor | None = None, *, hoist_k_norm: bool = True
    ) -> DiTCondition:
        """context (B, L, caption_dim), context_mask (B, L) (nonzero = valid) or None (all valid).
        hoist_k_norm applies each layer's cross-attention norm_k here, once, instead of inside the
        attention op at every step; training leaves it to the op (whose backward covers it)."""
        if context.dim() != 3 or context.shape[-1] != self.cfg.caption_dim:
            raise ValueError(f"DiT context must be (B, L, {self.cfg.caption_dim}), got {tuple(context.shape)}")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"DiT context_mask must be {tuple(context.shape[:2])} to match the context, got {tuple(context_mask.shape)}"
            )
        caption = self.caption_projection(context)
        if context_mask is None:
            pooled = caption.float().mean(1)
            key_mask = None
        else:
            m = context_mask.float()[..., None]
            pooled = (caption.float() * m).sum(1) / m.sum(1)
            key_mask = context_mask.bool()
        caption_emb = self.time_caption_embed.caption_embedder(pooled.to(caption.dtype))
        cross_kv = torch.stack([layer.cross_kv(caption, hoist_k_norm) for layer in self.layers])
        return DiTCondition(caption, caption_emb, cross_kv, key_mask, hoist_k_norm)

    def modulations(self, timesteps: torch.Tensor, cond: DiTCondition) -> DiTSchedule:
        """adaLN terms for S timesteps at once: timesteps (S,) or (S, B)."""
        s, b = timesteps.shape[0], cond.batch_size
        t = timesteps.to(cond.caption.device).reshape(s, -1).expand(s, b).reshape(s * b)
        temb = self.time_caption_embed.timestep_embedder(timestep_features(t).to(cond.caption.dtype))
        silu = F.silu(temb + cond.caption_emb.repeat(s, 1))
        per_layer = []
        for layer in self.layers:
            sm, gm, sf, gf = layer.norm1.linear(silu).view(s, b, 4, -1).unbind(2)
            per_layer.append(torch.stack([sm, gm.tanh(), sf, gf.tanh()], dim=1))  # (S, 4, B, dim)
        final = self.norm_out.linear_1(silu).view(s, b, -1)
        return DiTSchedule(torch.stack(per_layer, dim=1), final)

    def forward_with_condition(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: DiTCondition,
        modulation: DiTModulation | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, h, w), timestep (B,) or scalar (t = sigma*1000, 1000 = noise) ->
        (B, in_channels, h, w). `modulation`, one step of `modulations`, replaces computing it from timestep."""
        cfg, p = self.cfg, self.cfg.patch_size
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"DiT input must be (B, {cfg.in_channels}, h, w) with h, w multiples of {p}, got {tuple(x.shape)}"
            )
        b, c, hgt, wid = x.shape
        if cond.batch_size != b:
            raise ValueError(f"DiT condition has batch {cond.batch_size} but the input has batch {b}")
        ht, wt = hgt // p, wid // p
        if modulation is None:
            timestep = torch.as_tensor(timestep, device=x.device)
            timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep
            if tuple(timestep.shape) != (b,):
                raise ValueError(f"DiT timestep must be a scalar or ({b},), got {tuple(timestep.shape)}")
            modulation = self.modulations(timestep[None], cond)[0]

        tokens = x.view(b, c, ht, p, wt, p).permute(0, 2, 4, 1, 3, 5).reshape(b, ht * wt, c * p * p)
        hs = self.patch_embedder.proj(tokens)
        cos, sin = self.rope_tables(ht, wt, b, x.device)
        mods, n = modulation.layers, len(self.layers)
        # Each layer's epilogue also norms and modulates the next layer's input (see NextDiTBlock).
        h = rms_norm_modulate(hs, self.layers[0].norm1.norm.weight, mods[0, 0], cfg.norm_eps)
        # unbind, not cross_kv[i]: each select's backward zero-fills a gradient of the whole stack, once
        # per layer (the tiny-shapes DiT: 17 MB each, 13% of a training step); unbind's stacks them once.
        for i, (layer, kv) in enumerate(zip(self.layers, cond.cross_kv.unbind(0))):
            nxt = (self.layers[i + 1].norm1.norm.weight, mods[i + 1, 0]) if i + 1 < n else None
            hs, h = layer(hs, h, mods[i], cos, sin, kv, cond, nxt)
        out = self.norm_out(hs, modulation.final_scale)
        # Each output token holds a (p, p, C) patch.
        return out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hgt, wid)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training / one-off call: the cross-attention norm_k runs inside the attention op."""
        cond = self.precompute_condition(context, context_mask, hoist_k_norm=False)
        return self.forward_with_condition(x, timestep, cond)
