"""Varlen causal prefill attention Triton kernel: the Triton face of blip3o_fast.ops.varlen_prefill_attention
(contract in its docstring). Needs a power-of-two head dim D from 16 to 128 (tiles hold whole heads; a
tensor-core dot needs K >= 16).

Flash-attention forward over packed sequences, one program per (BLOCK_M queries of one sequence, q head).
The grid's first axis numbers every sequence's query tiles back to back, so prompts of mixed lengths pack
densely; each program finds its sequence itself (a sequence lookup: per-sequence tile counts from
cu_seqlens, cumulated in-kernel, so there is no host-side table and no device sync). cdiv(N, BLOCK_M) + S
programs bound the tile count; the spare ones find no sequence and do nothing. Offsets are clamped into
[0, N], so unchecked device offsets never address out of bounds.
Keys go in two phases: the tiles wholly below the diagonal with no mask (unmasked, vectorised loads),
then the diagonal tiles with the causal mask; tiles above the diagonal are never visited. GQA reads kv
head h // (H / KVH). Online softmax in base 2 (scale * log2(e) applied to the fp32 scores), fp32
accumulator, one rounding at the store.
Dots: 16-bit operands in their own dtype (wgmma on sm_90 with 64-row warpgroup tiles, mma on sm_80);
fp32 as three TF32 passes (about fp32 accuracy; an IEEE fp32 dot spills at any useful tile). Under the
interpreter (reference/environment.md) every dot runs in fp32 (UPCAST: its bf16 dot is wrong) and bf16
operands stay unrounded (F32_OPERANDS: its bf16 cast truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 operands: three TF32 passes; 16-bit operands ignore input_precision.
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _key_tile(acc, m_i, l_i, q, k_ptr, v_ptr, row0, n0, q_pos, length, kv_col, row_stride, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
              F32_OPERANDS: tl.constexpr):
    """One key tile (keys n0 .. n0 + BLOCK_N of the sequence starting at row row0) into the running
    (acc, m, l) of the query tile q. CAUSAL: a diagonal tile, so keys past each query (or past the
    sequence) are masked; otherwise every key of the tile is below the diagonal and in range."""
    dt = tl.float32 if F32_OPERANDS else k_ptr.dtype.element_ty
    kpos = n0 + tl.arange(0, BLOCK_N)
    offs = (row0 + kpos).to(tl.int64)[:, None] * row_stride + kv_col + tl.arange(0, D)[None, :]
    if CAUSAL:
        k_ok = (kpos < length)[:, None]
        k = tl.load(k_ptr + offs, mask=k_ok, other=0.0)
        v = tl.load(v_ptr + offs, mask=k_ok, other=0.0)
    else:
        k = tl.load(k_ptr + offs)
        v = tl.load(v_ptr + offs)
    s = _dot(q, tl.trans(k.to(dt)), None, UPCAST) * qk_scale
    if CAUSAL:
        s = tl.where(kpos[None, :] <= q_pos[:, None], s, float("-inf"))
    # Every query row sees a finite score in its first tile (key n0 <= its position), so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p.to(dt), v.to(dt), acc * alpha[:, None], UPCAST)
    return acc, m_new, l_i


@triton.jit
def varlen_prefill_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, out_ptr, S, N, H, KVH, GROUP, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr, F32_OPERANDS: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    # Sequence lookup: the sequence whose tiles [ends - tiles, ends) hold this program's tile.
    seq = tl.arange(0, BLOCK_S)
    seq_ok = seq < S
    lo = tl.load(cu_ptr + seq, mask=seq_ok, other=0)
    hi = tl.load(cu_ptr + seq + 1, mask=seq_ok, other=0)
    lo = tl.minimum(tl.maximum(lo, 0), N)
    hi = tl.minimum(tl.maximum(hi, lo), N)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    mine = (ends - tiles <= tile) & (tile < ends)  # at most one sequence (empty ones own no tile)
    row0 = tl.sum(tl.where(mine, lo, 0), 0)
    length = tl.sum(tl.where(mine, hi - lo, 0), 0)
    m0 = tl.where(length > 0, (tile - tl.sum(tl.where(mine, ends - tiles, 0), 0)) * BLOCK_M, 0)

    dt = tl.float32 if F32_OPERANDS else q_ptr.dtype.element_ty
    q_pos = m0 + tl.arange(0, BLOCK_M)
    q_ok = (q_pos < length)[:, None]
    d = tl.arange(0, D)
    q_offs = (row0 + q_pos).to(tl.int64)[:, None] * (H * D) + h * D + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_ok, other=0.0).to(dt)
    kv_col = (h // GROUP) * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, m0, BLOCK_N):  # below the diagonal: no mask
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_ptr, v_ptr, row0, n0, q_pos, length, kv_col, KVH * D,
                                  qk_scale, D, BLOCK_N, False, UPCAST, F32_OPERANDS)
    for n0 in range(m0, tl.minimum(m0 + BLOCK_M, length), BLOCK_N):  # the diagonal tiles
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_ptr, v_ptr, row0, n0, q_pos, length, kv_col, KVH * D,
                                  qk_scale, D, BLOCK_N, True, UPCAST, F32_OPERANDS)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l = 0 only on a spare program's rows, never stored
    tl.store(out_ptr + q_offs, o.to(out_ptr.dtype.element_ty), mask=q_ok)


def check_head_dim(d: int) -> None:
    if d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"varlen_prefill_attention (Triton face): head dim D must be a power of two from 16 to 128, "
                         f"got {d}")


# (fp32?, D <= 64?, long?) -> (BLOCK_M, BLOCK_N, num_warps) on GPUs, each checked spill-free for sm_80 and
# sm_90 by benchmarks/gpu_static_report.py (sm_80's mma keeps more in registers than wgmma). 16-bit: 64-row
# warpgroup tiles for wgmma; prompts longer than 64 tokens take 128 query rows over 8 warps (half the K/V
# reloads). fp32 dots run as three TF32 passes whose split operands take three times the registers:
# smaller tiles. BLOCK_M is a multiple of BLOCK_N (the diagonal phase starts on a key tile boundary).
_GPU_BLOCKS = {
    (False, True, False): (64, 32, 4), (False, True, True): (128, 64, 8),
    (False, False, False): (64, 32, 4), (False, False, True): (128, 32, 8),
    (True, True, False): (64, 16, 4), (True, True, True): (64, 16, 4),
    (True, False, False): (32, 16, 8), (True, False, True): (32, 16, 8),
}


def prefill_blocks(d: int, dtype: torch.dtype, max_seqlen: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter pays per program and per loop step: one square tile
    covering the longest sequence (up to 128)."""
    if interpreting():
        block = max(16, min(triton.next_power_of_2(max(max_seqlen, 1)), 128))
        return block, block, 4
    return _GPU_BLOCKS[(dtype == torch.float32, d <= 64, max_seqlen > 64)]


def seq_block(seqs: int) -> int:
    """BLOCK_S: the sequence lookup's vector width (at least 16, so few distinct compiles)."""
    return max(16, triton.next_power_of_2(seqs))


def varlen_prefill_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 max_seqlen: int, scale: float, out: torch.Tensor) -> None:
    n, h, d = q.shape
    kvh = k.shape[1]
    seqs = cu_seqlens.numel() - 1
    check_head_dim(d)
    if n == 0 or seqs == 0:
        return
    block_m, block_n, warps = prefill_blocks(d, q.dtype, max_seqlen)
    varlen_prefill_attention_fwd_kernel[(triton.cdiv(n, block_m) + seqs, h)](
        q, k, v, cu_seqlens, out, seqs, n, h, kvh, h // kvh, scale * LOG2E,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=seq_block(seqs), UPCAST=interpreting(),
        F32_OPERANDS=interpreting() and q.dtype == torch.bfloat16, num_warps=warps,
    )
