"""RoPE + KV-cache write Triton kernel: the Triton face of blip3o_fast.ops.rope_kv_cache_write (contract in
its docstring).

One program per token: its cos/sin row, then its q heads and k heads as (heads, D/2) half-row tiles
(rotate-half layout: channel i pairs with i + D/2, as kernels/rope.py's "half" path), rotated in fp32 and
stored to q_rot / k_rot; when the token's slot is inside the pool, the rotated k and the v rows are stored
to the caches there too. The head dim is a constexpr, so every half row is known 16-byte aligned and the
loads and stores are 16-byte vectors. One rounding at the store, as apply_rope.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for


@triton.jit
def _half_rows(row0, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Offsets of the first halves of rows row0 .. row0 + heads (each 2 * HALF long), and their mask."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    offs = (row0 + h)[:, None] * (2 * HALF) + i[None, :]
    return offs, (h < heads)[:, None] & (i < HALF)[None, :]


@triton.jit
def rope_kv_cache_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr, ko_ptr, num_slots, H, KVH,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + t * HALF + i, mask=i < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * HALF + i, mask=i < HALF, other=0.0)[None, :]
    dt = qo_ptr.dtype.element_ty

    offs, mask = _half_rows(t * H, H, HALF, BLOCK_H, BLOCK_HALF)
    a = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(q_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(qo_ptr + offs, (a * c - b * s).to(dt), mask=mask)
    tl.store(qo_ptr + offs + HALF, (b * c + a * s).to(dt), mask=mask)

    offs, mask = _half_rows(t * KVH, KVH, HALF, BLOCK_KVH, BLOCK_HALF)
    a = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(k_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    ka = (a * c - b * s).to(dt)
    kb = (b * c + a * s).to(dt)
    tl.store(ko_ptr + offs, ka, mask=mask)
    tl.store(ko_ptr + offs + HALF, kb, mask=mask)

    slot = tl.load(slot_ptr + t)
    if (slot >= 0) & (slot < num_slots):  # negative: a padding row; past the pool: dropped, never out of bounds
        cache, _ = _half_rows(slot * KVH, KVH, HALF, BLOCK_KVH, BLOCK_HALF)
        tl.store(kc_ptr + cache, ka, mask=mask)
        tl.store(kc_ptr + cache + HALF, kb, mask=mask)
        tl.store(vc_ptr + cache, tl.load(v_ptr + offs, mask=mask), mask=mask)
        tl.store(vc_ptr + cache + HALF, tl.load(v_ptr + offs + HALF, mask=mask), mask=mask)


def rope_kv_cache_write_blocks(heads: int, kv_heads: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_HALF, BLOCK_H, BLOCK_KVH, num_warps): whole half rows of every head of one token."""
    block_half = triton.next_power_of_2(max(d // 2, 1))
    block_h = triton.next_power_of_2(max(heads, 1))
    return block_half, block_h, triton.next_power_of_2(max(kv_heads, 1)), num_warps_for(2 * block_h * block_half)


def rope_kv_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, q_rot: torch.Tensor,
                        k_rot: torch.Tensor) -> None:
    t, h, d = q.shape
    kvh = k.shape[1]
    if t == 0 or d == 0:
        return
    block_half, block_h, block_kvh, warps = rope_kv_cache_write_blocks(h, kvh, d)
    rope_kv_cache_write_kernel[(t,)](
        q, k, v, cos, sin, k_cache, v_cache, slots, q_rot, k_rot, k_cache.shape[0] * k_cache.shape[1], h, kvh,
        HALF=d // 2, BLOCK_HALF=block_half, BLOCK_H=block_h, BLOCK_KVH=block_kvh, num_warps=warps,
    )
