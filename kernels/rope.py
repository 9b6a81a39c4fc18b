"""RoPE Triton kernel: the Triton face of blip3o_fast.ops.rope (contract in its docstring).

x (B, T, H, D) is walked as B*T*H rows of D channels; BLOCK_R rows per program, and each row reads
the cos/sin row of its token (row // H), which the heads of one token share through the cache.
"half" layout rotates channel i with i + D/2: two contiguous half-row loads. "interleaved" rotates
2i with 2i+1: the row is loaded whole as (D/2, 2) pairs and split, so loads stay contiguous.
INVERSE rotates by -angle (the backward). fp32 math, one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, tile_elements


@triton.jit
def rope_apply_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, rows, H, D,
    BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
):
    half = D // 2
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_HALF)
    mask = (row < rows)[:, None] & (i < half)[None, :]
    tab = (row // H)[:, None] * half + i[None, :]
    c = tl.load(cos_ptr + tab, mask=mask, other=0.0)
    s = tl.load(sin_ptr + tab, mask=mask, other=0.0)
    if INVERSE:
        s = -s
    base = row[:, None] * D
    if INTERLEAVED:
        offs = (base + 2 * i[None, :])[:, :, None] + tl.arange(0, 2)[None, None, :]
        mask2 = tl.broadcast_to(mask[:, :, None], (BLOCK_R, BLOCK_HALF, 2))
        a, b = tl.split(tl.load(x_ptr + offs, mask=mask2, other=0.0).to(tl.float32))
        y = tl.join(a * c - b * s, a * s + b * c)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask2)
    else:
        offs = base + i[None, :]
        a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + offs + half, (b * c + a * s).to(out_ptr.dtype.element_ty), mask=mask)


def rope_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_HALF): a whole head's half-row per row, rows stacked to one tile."""
    block_half = triton.next_power_of_2(max(d // 2, 1))
    return max(1, tile_elements() // (2 * block_half)), block_half


def rope_apply(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, interleaved: bool, inverse: bool
) -> None:
    _, _, h, d = x.shape
    rows = x.numel() // d if d else 0
    if rows == 0:
        return
    block_r, block_half = rope_blocks(d)
    block_r = min(block_r, triton.next_power_of_2(rows))
    rope_apply_kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, out, rows, h, d, BLOCK_R=block_r, BLOCK_HALF=block_half,
        INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), num_warps=num_warps_for(2 * block_r * block_half),
    )
