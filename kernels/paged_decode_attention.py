"""Paged decode attention Triton kernels: the Triton face of blip3o_fast.ops.paged_decode_attention
(contract in its docstring). Head dims 64 and 128.

split    one program per (split, kv head, sequence). The GQA group's query heads are the M dimension of
         tl.dot (padded to 16, the smallest tensor-core tile), so each K/V row is read once per group.
         The program walks its split's tokens BLOCK_N at a time: a token's block comes from the table,
         its row is block * block_size + offset; every row is D contiguous values at a 16-divisible
         offset, so K/V load as 16-byte vectors whatever the block size (odd ones too). Online softmax
         in base 2. One split writes out directly; several write normalised partials and their lse.
combine  one program per (sequence, head): the splits' lse -> weights, out = weighted sum of partials.
Math in fp32. Scores are one dot of the operands as stored (bf16/fp16 tensor cores on GPUs; fp32 as an
IEEE fp32 dot: M is only 16, so it fits in registers), scaled afterwards; P is rounded to the cache's
dtype for the P V dot. Under the interpreter (reference/environment.md) dots run in fp32 (UPCAST: its
bf16 dot is wrong) and P stays fp32 (its bf16 cast truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import interpreting

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def paged_decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    H, GROUP, max_blocks, block_size, stride_block, stride_token, num_splits, qk_scale,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    split = tl.program_id(0)
    kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    d = tl.arange(0, D)
    head = kv * GROUP + g
    q = tl.load(q_ptr + (b * H + head)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
    # The split's tokens (blip3o/paged_decode_attention.h, split_tokens): whole blocks, ceil(blocks / splits) each.
    seq_len = tl.maximum(tl.load(len_ptr + b), 0)
    per = tl.cdiv(tl.cdiv(seq_len, block_size), num_splits) * block_size
    begin = tl.minimum(split * per, seq_len)
    end = tl.minimum(split * per + per, seq_len)
    p_dt = tl.float32 if UPCAST else k_ptr.dtype.element_ty
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    table = table_ptr + b * max_blocks
    # num_stages=1: K/V go straight to registers as 16-byte ld.global.v4 (a pipelined loop would stage
    # them through shared memory by cp.async); the many (split, kv head, sequence) programs hide latency.
    for t0 in tl.range(begin, end, BLOCK_N, num_stages=1):
        tok = t0 + tl.arange(0, BLOCK_N)
        ok = tok < end
        blk = tl.load(table + tok // block_size, mask=ok, other=0)
        row = blk.to(tl.int64) * stride_block + (tok % block_size) * stride_token + kv * D
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), None, UPCAST) * qk_scale  # base-2 scores
        s = tl.where(ok[None, :], s, float("-inf"))
        # Every tile holds a live token, so m_new is finite; alpha = 0 on the first tile (m_i = -inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(p_dt), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    live = l_i > 0.0
    o = acc / tl.where(live, l_i, 1.0)[:, None]  # an empty split (or sequence) leaves acc = 0: o = 0
    if SPLIT:
        lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        prow = (b * H + head) * num_splits + split
        tl.store(part_out_ptr + prow[:, None] * D + d[None, :], o, mask=g_ok[:, None])
        tl.store(part_lse_ptr + prow, lse, mask=g_ok)
    else:
        tl.store(out_ptr + (b * H + head)[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])


@triton.jit
def paged_decode_attention_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits,
                                          D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    # Empty splits (lse = -inf) weigh exp(-inf) = 0; a row with every split empty shifts by 0, not -inf.
    w = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    o = tl.load(part_out_ptr + (row * num_splits + s)[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    acc = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + d, acc.to(out_ptr.dtype.element_ty))


def check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"paged_decode_attention (Triton face): head dim D must be one of {HEAD_DIMS}, got {d}")


def group_rows(group: int) -> int:
    """BLOCK_G: the GQA group's query heads padded to a tensor-core M tile (16 at least)."""
    return max(16, triton.next_power_of_2(group))


def split_blocks(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N tokens per step, num_warps) of the split kernel, each checked spill-free for sm_80 and
    sm_90 by benchmarks/gpu_static_report.py. fp32 K/V tiles take twice the registers: fewer tokens
    (fp32 at D=128 spilled on sm_90 with 32).
    The interpreter pays per loop step: big tiles."""
    if interpreting():
        return 128, 4
    if dtype == torch.float32:
        return (16, 4) if d > 64 else (64, 4)
    return 64, 4


def combine_block(num_splits: int) -> int:
    return max(2, triton.next_power_of_2(num_splits))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, scale) -> None:
    b, h, d = q.shape
    _, block_size, kvh, _ = k_cache.shape
    check_head_dim(d)
    if b == 0:
        return
    splits = 1 if part_lse is None else part_lse.shape[2]
    group = h // kvh
    block_n, warps = split_blocks(d, q.dtype)
    # With one split the partial buffers are absent and never touched (SPLIT is off): out stands in.
    paged_decode_attention_split_kernel[(splits, kvh, b)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        out if part_out is None else part_out, out if part_lse is None else part_lse,
        h, group, block_tables.shape[1], block_size, block_size * kvh * d, kvh * d, splits, float(scale) * LOG2E,
        D=d, BLOCK_G=group_rows(group), BLOCK_N=block_n, SPLIT=splits > 1, UPCAST=interpreting(), num_warps=warps,
    )
    if splits > 1:
        paged_decode_attention_combine_kernel[(b * h,)](part_out, part_lse, out, splits, D=d,
                                                        BLOCK_S=combine_block(splits), num_warps=4)
