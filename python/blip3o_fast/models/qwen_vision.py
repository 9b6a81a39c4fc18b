"""Qwen2.5-VL vision tower: patch embedding, window/full attention blocks with 2-D RoPE, 2x2 patch merger.

Patches arrive flattened as (N, C * tp * p * p) in the image processor's order: merge blocks of
m x m patches are contiguous. Window attention groups whole merge blocks into windows of
window_size pixels; the tokens are permuted once so that every window (and every image) is a
contiguous segment, attention runs per segment, and the merged output is permuted back.
Parameter names equal the transformers 4.51 `visual.*` names without the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip3o_fast import ops
from blip3o_fast.models.config import VisionConfig
from blip3o_fast.models.text_decoder import RMSNorm

# Qwen2.5-VL's vision RoPE base; it is not part of the published vision config.
VISION_ROPE_THETA = 10000.0


class PatchProjection(nn.Module):
    """The Conv3d patch embedding as one matmul: kernel == stride, so each patch is a dot product."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tp, p, p))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.weight.flatten(1)
        if patches.dim() != 2 or patches.shape[1] != w.shape[1]:
            raise ValueError(f"pixel_values must be (N, {w.shape[1]}), got {tuple(patches.shape)}")
        return patches.to(w.dtype) @ w.t()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = PatchProjection(cfg)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Block-diagonal attention over (N, H, D) tokens split at cu_seqlens.

    Segments of equal length (most windows are full) run as one batched SDPA call, so the cost is
    a few calls per layer rather than one per window, and no N x N mask is built."""
    n, h, d = q.shape
    out = torch.empty_like(q)
    starts = torch.tensor(cu_seqlens[:-1])
    lengths = torch.tensor(cu_seqlens[1:]) - starts
    for length in lengths.unique().tolist():
        idx = (starts[lengths == length][:, None] + torch.arange(length)).to(q.device)  # (S, L)
        gather = [x[idx].permute(0, 2, 1, 3) for x in (q, k, v)]  # (S, H, L, D)
        o = F.scaled_dot_product_attention(*gather)
        out[idx] = o.permute(0, 2, 1, 3)
    return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q = ops.apply_rope(q[None], cos, sin)[0]
        k = ops.apply_rope(k[None], cos, sin)[0]
        return self.proj(segment_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then an MLP over each m x m block of patches to the text width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))
        self.merged = merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))


def vision_grid_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(N, 2) (row, col) patch coordinates in the processor's order (merge blocks contiguous)."""
    rows = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h)[:, None].expand(h, w)
        ww = torch.arange(w)[None, :].expand(h, w)
        block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()  # noqa: E731
        rows.append(torch.stack((block(hh), block(ww)), dim=-1).repeat(t, 1))
    return torch.cat(rows)


def window_partition(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Window order of the merge blocks, window boundaries and image (per frame) boundaries.

    Returns window_index (n_blocks,) : block j of the permuted sequence is block window_index[j] of the
    input; cu_window and cu_full: cumulative token (patch) counts. Windows tile each frame's grid of
    merge blocks row-major, `window` blocks per side; edge windows are smaller."""
    order, cu_window, cu_full = [], [0], [0]
    unit = merge * merge
    offset = 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        nh, nw = -(-lh // window), -(-lw // window)
        idx = torch.arange(t * lh * lw).view(t, lh, lw)
        padded = F.pad(idx, (0, nw * window - lw, 0, nh * window - lh), value=-1)
        wins = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        for count in (wins >= 0).sum(-1).tolist():
            cu_window.append(cu_window[-1] + count * unit)
        flat = wins.flatten()
        order.append(flat[flat >= 0] + offset)
        for _ in range(t):
            cu_full.append(cu_full[-1] + h * w)
        offset += t * lh * lw
    return torch.cat(order), cu_window, cu_full


class QwenVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError("VisionConfig: head_dim = hidden_size / num_heads must be a multiple of 4 (2-D RoPE)")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        # One frequency set shared by the row and column axes, each over a quarter of the head.
        self._inv_freq = ops.rope_inv_freq(head_dim // 2, VISION_ROPE_THETA)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*tp*p*p), grid_thw (n_images, 3) -> (N / merge^2, out_hidden_size)."""
        cfg = self.cfg
        m, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        grid_thw = torch.as_tensor(grid_thw).cpu().long().view(-1, 3)
        if (grid_thw[:, 1:] % m).any():
            raise ValueError(
                f"grid_thw heights and widths must be multiples of spatial_merge_size {m}: {grid_thw.tolist()}"
            )
        n = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {n}")
        window_index, cu_window, cu_full = window_partition(grid_thw, m, cfg.window_size // m // cfg.patch_size)
        window_index = window_index.to(pixel_values.device)

        def to_windows(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

        x = to_windows(self.patch_embed(pixel_values))
        pos = vision_grid_positions(grid_thw, m).to(pixel_values.device).float()
        inv = self._inv_freq.to(pixel_values.device)
        angles = to_windows(torch.cat((pos[:, :1] * inv, pos[:, 1:] * inv), dim=-1))[None]  # (1, N, D/2)
        cos, sin = angles.cos(), angles.sin()
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_full if i in full else cu_window)
        return self.merger(x)[torch.argsort(window_index)]
