"""The autoregressive text decoder shared by both backbones: LLaMA 3 and the Qwen2.5-VL language model.

Both are pre-norm decoder stacks (RMSNorm, GQA attention with RoPE, SwiGLU MLP); they differ only in
q/k/v biases (Qwen2) and in RoPE: LLaMA 3 uses 1-D positions with the "llama3" frequency scaling,
Qwen2.5-VL uses 3-D M-RoPE positions (time, height, width). Parameter names equal the transformers
4.51 checkpoint names without the leading "model.", so published weights load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blip3o_fast import ops
from blip3o_fast.models.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys and values, per layer (B, kv_heads, max_len, head_dim), filled left to right.

    Every sequence of the batch shares one write offset (`length`); ragged prompts are left-padded and
    the attention mask hides the padding. A paged cache will replace this behind the same two calls:
    `update(layer, k, v)` during a forward, then `advance(n)` once all layers have written."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_config(cls, cfg: TextConfig, batch: int, max_len: int, *, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.dim_per_head,
                   dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, D) after the cached tokens; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} tokens exceed the cache's max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def text_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """RoPE inverse frequencies of the decoder, with LLaMA 3's frequency scaling when configured."""
    head_dim = cfg.dim_per_head
    inv_freq = ops.rope_inv_freq(head_dim, cfg.rope_theta)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "mrope"):  # Qwen2.5-VL checkpoints name their M-RoPE here; no frequency change
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'llama3' (or none) is implemented")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended linearly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = ops.apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = ops.apply_rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_bias_mask(attention_mask: torch.Tensor | None, batch: int, t: int, past: int, device) -> torch.Tensor:
    """Boolean (B, 1, T, past+T) mask, True = may attend: causal, padding keys hidden.

    A query always sees itself, so the rows of left-padding tokens are never empty: an all-masked row
    gives NaN in attention, which would then leak through their values into later layers."""
    total = past + t
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is None:
        return allowed.expand(batch, 1, t, total)
    if attention_mask.shape != (batch, total):
        raise ValueError(
            f"attention_mask must be (batch, cached + new tokens) = ({batch}, {total}), "
            f"got {tuple(attention_mask.shape)}"
        )
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return (allowed & keys) | (k_pos == q_pos)[None, None]


class TextDecoder(nn.Module):
    """Embeddings, decoder layers and the final norm: returns final-normed hidden states (B, T, H)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.arch not in ("llama3", "qwen2_5_vl"):
            raise ValueError(f"TextConfig.arch must be 'llama3' or 'qwen2_5_vl', got {cfg.arch!r}")
        cfg.check_mrope()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A plain fp32 tensor, not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq = text_inv_freq(cfg)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def rope_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, D/2) from 1-D positions (B, T) or, for Qwen2.5-VL, 3-D positions (3, B, T)."""
        if self.cfg.arch == "qwen2_5_vl":
            if position_ids.dim() == 2:  # text-only: the same position on all three axes
                position_ids = position_ids[None].expand(3, -1, -1)
            if position_ids.dim() != 3 or position_ids.shape[0] != 3:
                shape = tuple(position_ids.shape)
                raise ValueError(f"Qwen2.5-VL position_ids must be (3, B, T) or (B, T), got {shape}")
            return ops.mrope_cos_sin(position_ids, self.inv_freq(position_ids.device), self.cfg.mrope_section)
        if position_ids.dim() != 2:
            raise ValueError(f"LLaMA position_ids must be (B, T), got {tuple(position_ids.shape)}")
        return ops.rope_cos_sin(position_ids, self.inv_freq(position_ids.device))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, H); position_ids (B, T) or (3, B, T), default past..past+T-1;
        attention_mask (B, past+T), 1 = real token, None = no padding."""
        b, t, _ = inputs_embeds.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device).expand(b, t)
        if position_ids.shape[-2:] != (b, t):
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match inputs of (B, T) = ({b}, {t})")
        cos, sin = self.rope_tables(position_ids)
        mask = attention_bias_mask(attention_mask, b, t, past, inputs_embeds.device)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(x)
