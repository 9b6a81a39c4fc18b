"""BLIP3-o's diffusion transformer: Lumina-Next DiT with a caption projection (spec section 3).

Parameter names equal the published checkpoint's keys below `model.dit.model.` (and diffusers'
LuminaNextDiT2DModel's, whose upstream `pad_token` BLIP3-o removed), so weights load by name.

The context is fixed for a whole sampling run, so everything derived from it alone (projected
caption, pooled caption embedding, every layer's cross-attention K/V) is built once by
`precompute_condition`; `forward_with_condition` then runs one denoising step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o_fast.models.config import DiTConfig
from blip3o_fast.ops import apply_rope, lumina_2d_cos_sin, rms_norm, rms_norm_modulate, swiglu

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


def _expand_kv_heads(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, Hkv, D) -> (B, Hkv*n_rep, T, D): query head h reads kv head h // n_rep."""
    t = t.transpose(1, 2)
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)


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

    def cross_kv(self, caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K (after norm_k, no RoPE) and V as (B, heads, L, head_dim)."""
        b, n, _ = caption.shape
        c = self.norm1_context(caption)
        k = self.attn2.norm_k(self.attn2.to_k(c)).view(b, n, self.kv_heads, self.head_dim)
        v = self.attn2.to_v(c).view(b, n, self.kv_heads, self.head_dim)
        n_rep = self.heads // self.kv_heads
        return _expand_kv_heads(k, n_rep).contiguous(), _expand_kv_heads(v, n_rep).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mod: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """mod: this layer's (scale_msa, tanh(gate_msa), scale_mlp, tanh(gate_mlp)), each (B, dim)."""
        b, t, _ = x.shape
        h, d, n_rep = self.heads, self.head_dim, self.heads // self.kv_heads
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod
        hs = rms_norm_modulate(x, self.norm1.norm.weight, scale_msa, self.eps)

        a1 = self.attn1
        q = apply_rope(a1.norm_q(a1.to_q(hs)).view(b, t, h, d), cos, sin, interleaved=True)
        k = apply_rope(a1.norm_k(a1.to_k(hs)).view(b, t, self.kv_heads, d), cos, sin, interleaved=True)
        v = a1.to_v(hs).view(b, t, self.kv_heads, d)
        # The self-attention mask is all ones: leaving it out keeps SDPA's fused backends usable.
        self_out = F.scaled_dot_product_attention(
            q.transpose(1, 2), _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        )

        a2 = self.attn2
        q2 = apply_rope(a2.norm_q(a2.to_q(hs)).view(b, t, h, d), cos, sin, interleaved=True)
        cross_out = F.scaled_dot_product_attention(q2.transpose(1, 2), cross_k, cross_v, attn_mask=cross_mask)

        mixed = self_out + cross_out * self.gate.tanh().view(1, h, 1, 1)
        out = a2.to_out[0](mixed.transpose(1, 2).reshape(b, t, h * d))
        x = x + gate_msa[:, None, :] * self.norm2(out)
        ff = self.feed_forward(rms_norm_modulate(x, self.ffn_norm1.weight, scale_mlp, self.eps))
        return x + gate_mlp[:, None, :] * self.ffn_norm2(ff)


@dataclass
class DiTCondition:
    """What a sampling run reuses every step: derived from the context alone."""

    caption: torch.Tensor  # (B, L, hidden): the context after caption_projection
    caption_emb: torch.Tensor  # (B, temb_dim): embedding of the (masked) mean caption token
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V: (B, heads, L, head_dim)
    cross_mask: torch.Tensor | None  # (B, 1, 1, L) bool, None when every context token is valid

    @property
    def batch_size(self) -> int:
        return self.caption.shape[0]


@dataclass
class DiTModulation:
    """The adaLN terms of one timestep: they depend only on it and the condition, so a sampler
    computes those of its whole schedule at once (one GEMM per layer instead of one per step)."""

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # see NextDiTBlock.forward
    final_scale: torch.Tensor  # (B, dim)


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
        # (h_tokens, w_tokens, device) -> (cos, sin); derived data, kept out of the state dict.
        self._rope_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, h_tokens: int, w_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h_tokens, w_tokens, torch.device(device))
        if key not in self._rope_cache:
            cos, sin = lumina_2d_cos_sin(h_tokens, w_tokens, self.cfg.head_dim, self.cfg.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def precompute_condition(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> DiTCondition:
        """context (B, L, caption_dim), context_mask (B, L) (nonzero = valid) or None (all valid)."""
        if context.dim() != 3 or context.shape[-1] != self.cfg.caption_dim:
            raise ValueError(f"DiT context must be (B, L, {self.cfg.caption_dim}), got {tuple(context.shape)}")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"DiT context_mask must be {tuple(context.shape[:2])} to match the context, got {tuple(context_mask.shape)}"
            )
        caption = self.caption_projection(context)
        if context_mask is None:
            pooled = caption.float().mean(1)
            cross_mask = None
        else:
            m = context_mask.float()[..., None]
            pooled = (caption.float() * m).sum(1) / m.sum(1)
            cross_mask = context_mask.bool()[:, None, None, :]
        caption_emb = self.time_caption_embed.caption_embedder(pooled.to(caption.dtype))
        return DiTCondition(caption, caption_emb, [layer.cross_kv(caption) for layer in self.layers], cross_mask)

    def modulations(self, timesteps: torch.Tensor, cond: DiTCondition) -> list[DiTModulation]:
        """adaLN terms for S timesteps at once: timesteps (S,) or (S, B) -> S DiTModulation."""
        s, b = timesteps.shape[0], cond.batch_size
        t = timesteps.to(cond.caption.device).reshape(s, -1).expand(s, b).reshape(s * b)
        temb = self.time_caption_embed.timestep_embedder(timestep_features(t).to(cond.caption.dtype))
        silu = F.silu(temb + cond.caption_emb.repeat(s, 1))
        per_layer = []
        for layer in self.layers:
            sm, gm, sf, gf = layer.norm1.linear(silu).view(s, b, -1).chunk(4, dim=-1)
            per_layer.append((sm.contiguous(), gm.tanh(), sf.contiguous(), gf.tanh()))
        final = self.norm_out.linear_1(silu).view(s, b, -1)
        return [DiTModulation([tuple(m[i] for m in mods) for mods in per_layer], final[i]) for i in range(s)]

    def forward_with_condition(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: DiTCondition,
        modulation: DiTModulation | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, h, w), timestep (B,) or scalar (t = sigma*1000, 1000 = noise) ->
        (B, in_channels, h, w). `modulation`, from `modulations`, replaces computing it from timestep."""
        cfg, p = self.cfg, self.cfg.patch_size
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"DiT input must be (B, {cfg.in_channels}, h, w) with h, w multiples of {p}, got {tuple(x.shape)}"
            )
        b, c, hgt, wid = x.shape
        if cond.batch_size != b:
            raise ValueError(f"DiT condition has batch {cond.batch_size} but the input has batch {b}")
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"DiT timestep must be a scalar or ({b},), got {tuple(timestep.shape)}")
        ht, wt = hgt // p, wid // p

        tokens = x.view(b, c, ht, p, wt, p).permute(0, 2, 4, 1, 3, 5).reshape(b, ht * wt, c * p * p)
        hs = self.patch_embedder.proj(tokens)
        mod = modulation if modulation is not None else self.modulations(timestep[None], cond)[0]
        cos, sin = self.rope_tables(ht, wt, x.device)
        for layer, layer_mod, (k, v) in zip(self.layers, mod.layers, cond.cross_kv):
            hs = layer(hs, layer_mod, cos, sin, k, v, cond.cross_mask)
        out = self.norm_out(hs, mod.final_scale)
        # Each output token holds a (p, p, C) patch.
        return out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hgt, wid)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_with_condition(x, timestep, self.precompute_condition(context, context_mask))
