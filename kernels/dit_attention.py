"""Fused DiT attention Triton kernels: the Triton face of blip3o_fast.ops.dit_attention (contract in its
docstring). Needs a power-of-two head dim D from 16 to 128 (a tensor-core dot needs K >= 16; the tiles
hold whole heads).

Forward, two launches:
  stats  per token, mean and rstd of q over all Hq*D channels (and of k when k_weight is given) into
         fp32 scratch: LayerNorm across heads needs the whole token row, which no attention tile sees.
  fwd    flash attention, one program per (BLOCK_M queries, batch, q head), walking BLOCK_N keys at a
         time with an online softmax in base 2. Each q tile and k tile is normalised and rotated on the
         fly as it is loaded: (pairs of) channels are loaded as (rows, D/2, 2), split into the pair's
         halves for RoPE and joined back, so the dot sees the interleaved layout of the reference.
         GQA reads kv head h // (Hq / Hkv). Epilogue: lse, o, out = residual + tanh(gate) * o.
Backward, flash-style (P recomputed from lse):
  pre    delta = rowsum(dout * o) * tanh(gate) per query; one program per head also sums the gate's
         gradient over every token in a fixed order.
  prep   q and k normalised and rotated once (q also scaled) into operand-dtype scratch: keeping that
         work out of the two kernels' inner loops is what keeps them from spilling.
  dq     one program per q tile: dq through the scores, then back through RoPE into fp32 scratch.
  dkdv   one program per k tile and kv head, looping over its group's q heads and q tiles (no atomics):
         dv, dk through RoPE; into dk directly, or fp32 scratch when k has its own LayerNorm.
  ln     the LayerNorm backward over whole token rows, with per-program partials of dweight/dbias
         summed in a fixed order (rms_norm's sum_partials): deterministic parameter gradients.
Math in fp32. Dot operands are rounded once to the input dtype (bf16/fp16 tensor cores on GPUs); fp32
input runs its dots as three TF32 tensor-core passes (about fp32 accuracy; an IEEE fp32 dot spills at
any useful tile). Under the interpreter (reference/environment.md) every dot runs in fp32 (UPCAST: its
bf16 dot is wrong) and bf16 operands stay unrounded (F32_OPERANDS: its bf16 cast truncates, which
would double the rounding error a GPU makes); fp16 operands are still rounded there.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import (
    interpreting,
    num_warps_for,
    persistent_programs,
    row_blocks,
    row_tile,
    sum_partials,
    tile_elements,
)

LN_EPS = 1e-5
LOG2E = 1.4426950408889634  # the kernels inline it and ln(2): plain globals are not constexprs there


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 operands: three TF32 tensor-core passes (split hi/lo) keep ~fp32 accuracy; an IEEE fp32 dot
    # is a CUDA-core loop whose operand layouts spill at any useful tile. 16-bit operands ignore this.
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _load_head(x_ptr, tok, ok, col0, HD, stat_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr,
               BLOCK: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """Rows `tok` of x viewed as (tokens, HD), channels col0 .. col0 + 2*HALF (one head), as fp32
    (BLOCK, 2*HALF): LayerNorm'd with each token's stats and the head's slice of w/b when NORM, then
    rotated by each token's cos/sin row when ROPE."""
    i = tl.arange(0, HALF)
    pair = col0 + 2 * i[:, None] + tl.arange(0, 2)[None, :]
    x = tl.load(x_ptr + tok[:, None, None] * HD + pair[None, :, :], mask=ok[:, None, None], other=0.0)
    x = x.to(tl.float32)
    if NORM:
        mean = tl.load(stat_ptr + 2 * tok, mask=ok, other=0.0)
        rstd = tl.load(stat_ptr + 2 * tok + 1, mask=ok, other=0.0)
        w = tl.load(w_ptr + pair).to(tl.float32)
        b = tl.load(b_ptr + pair).to(tl.float32)
        x = (x - mean[:, None, None]) * rstd[:, None, None] * w[None, :, :] + b[None, :, :]
    if ROPE:
        tab = tok[:, None] * HALF + i[None, :]
        c = tl.load(cos_ptr + tab, mask=ok[:, None], other=0.0)
        s = tl.load(sin_ptr + tab, mask=ok[:, None], other=0.0)
        a, b2 = tl.split(x)
        x = tl.join(a * c - b2 * s, a * s + b2 * c)
    return tl.reshape(x, (BLOCK, 2 * HALF))


@triton.jit
def _unrotate(g, tok, ok, cos_ptr, sin_ptr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """The gradient through the RoPE rotation: rotate (BLOCK, 2*HALF) by -angle."""
    i = tl.arange(0, HALF)
    tab = tok[:, None] * HALF + i[None, :]
    c = tl.load(cos_ptr + tab, mask=ok[:, None], other=0.0)
    s = tl.load(sin_ptr + tab, mask=ok[:, None], other=0.0)
    ga, gb = tl.split(tl.reshape(g, (BLOCK, HALF, 2)))
    return tl.reshape(tl.join(ga * c + gb * s, gb * c - ga * s), (BLOCK, 2 * HALF))


@triton.jit
def dit_attention_stats_kernel(x_ptr, stat_ptr, rows, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """stat[row] = (mean, rstd) of x's row over N = H*D channels (biased variance, as LayerNorm)."""
    row, row_ok, mask, offs = row_tile(0, tl.program_id(0), rows, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(stat_ptr + 2 * row, mean, mask=row_ok)
    tl.store(stat_ptr + 2 * row + 1, rstd, mask=row_ok)


@triton.jit
def dit_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr, qstat_ptr, kstat_ptr,
    kmask_ptr, gate_ptr, res_ptr, out_ptr, lse_ptr, o_ptr,
    Tq, Tk, Hq, Hkv, GROUP, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_NORM: tl.constexpr, ROPE_K: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, WRITE_O: tl.constexpr,
    UPCAST: tl.constexpr, F32_OPERANDS: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    dt = tl.float32 if F32_OPERANDS else q_ptr.dtype.element_ty
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < Tq
    qtok = b * Tq + t
    qn = _load_head(q_ptr, qtok, t_ok, h * D, Hq * D, qstat_ptr, qw_ptr, qb_ptr, cos_ptr, sin_ptr,
                    BLOCK_M, D // 2, True, True)
    qs = (qn * qk_scale).to(dt)  # qk_scale = log2(e) / sqrt(D): scores come out in base 2
    d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        s_idx = n0 + tl.arange(0, BLOCK_N)
        s_in = s_idx < Tk
        ktok = b * Tk + s_idx
        keep = s_in
        if HAS_MASK:
            keep = keep & (tl.load(kmask_ptr + ktok, mask=s_in, other=0) != 0)
        kn = _load_head(k_ptr, ktok, s_in, hk * D, Hkv * D, kstat_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
                        BLOCK_N, D // 2, K_NORM, ROPE_K).to(dt)
        v = tl.load(v_ptr + ktok[:, None] * (Hkv * D) + hk * D + d[None, :], mask=s_in[:, None], other=0.0)
        s = _mm(qs, tl.trans(kn), None, UPCAST)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no live key yet keeps m = -inf; shifting by 0 instead keeps exp2 free of NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _mm(p.to(dt), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    live = l_i > 0.0
    o = acc / tl.where(live, l_i, 1.0)[:, None]  # a fully masked row has acc = 0: o = 0
    lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + (b * Hq + h) * Tq + t, lse, mask=t_ok)
    offs = qtok[:, None] * (Hq * D) + h * D + d[None, :]
    if WRITE_O:
        tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=t_ok[:, None])
    if HAS_GATE:
        o = o * _tanh(tl.load(gate_ptr + h).to(tl.float32))
    if HAS_RES:
        o += tl.load(res_ptr + offs, mask=t_ok[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def dit_attention_bwd_pre_kernel(
    dout_ptr, o_ptr, gate_ptr, delta_ptr, dgate_ptr, B, Tq, Hq,
    D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Per head h: delta[b, h, t] = tanh(g_h) * sum_d dout*o, and dgate_h = (1 - tanh^2) * sum_{b,t} of
    the same row sums, accumulated in a fixed order."""
    h = tl.program_id(0)
    d = tl.arange(0, D)
    tg = 1.0
    if HAS_GATE:
        tg = _tanh(tl.load(gate_ptr + h).to(tl.float32))
    total = tl.zeros([BLOCK_T], tl.float32)
    for b in range(B):
        for t0 in range(0, Tq, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < Tq
            offs = ((b * Tq + t).to(tl.int64) * Hq + h)[:, None] * D + d[None, :]
            do = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            o = tl.load(o_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            r = tl.sum(do * o, axis=1)
            tl.store(delta_ptr + (b * Hq + h).to(tl.int64) * Tq + t, r * tg, mask=ok)
            total += r
    if HAS_GATE:
        tl.store(dgate_ptr + h, (1.0 - tg * tg) * tl.sum(total, axis=0))


@triton.jit
def dit_attention_prep_kernel(
    x_ptr, stat_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr, tokens, H, scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """out = scale * RoPE(LayerNorm(x)) for BLOCK_T tokens of one head: the backward's dot operands,
    made once instead of in every inner loop step of the dq and dk/dv kernels."""
    h = tl.program_id(1)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < tokens
    y = _load_head(x_ptr, tok, ok, h * D, H * D, stat_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, BLOCK_T, D // 2, NORM, ROPE)
    offs = tok[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :]
    tl.store(out_ptr + offs, (y * scale).to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def dit_attention_bwd_dq_kernel(
    qs_ptr, kn_ptr, v_ptr, cos_ptr, sin_ptr, kmask_ptr, gate_ptr, dout_ptr, lse_ptr, delta_ptr, gq_ptr,
    Tq, Tk, Hq, Hkv, GROUP, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_GATE: tl.constexpr, UPCAST: tl.constexpr,
):
    """gq = d loss / d LayerNorm_q(q) (before RoPE), fp32, for one q tile of one head. qs: prepared
    q scaled by log2(e)/sqrt(D); kn: prepared k."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    dt = qs_ptr.dtype.element_ty
    d = tl.arange(0, D)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < Tq
    qtok = b * Tq + t
    offs = qtok[:, None] * (Hq * D) + h * D + d[None, :]
    qs = tl.load(qs_ptr + offs, mask=t_ok[:, None], other=0.0)
    do = tl.load(dout_ptr + offs, mask=t_ok[:, None], other=0.0).to(tl.float32)
    if HAS_GATE:
        do = do * _tanh(tl.load(gate_ptr + h).to(tl.float32))
    do = do.to(dt)
    row = (b * Hq + h) * Tq + t
    lse2 = tl.load(lse_ptr + row, mask=t_ok, other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # fully masked row: P = 0
    delta = tl.load(delta_ptr + row, mask=t_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        s_idx = n0 + tl.arange(0, BLOCK_N)
        s_in = s_idx < Tk
        ktok = b * Tk + s_idx
        keep = s_in
        if HAS_MASK:
            keep = keep & (tl.load(kmask_ptr + ktok, mask=s_in, other=0) != 0)
        koffs = ktok[:, None] * (Hkv * D) + hk * D + d[None, :]
        kn = tl.load(kn_ptr + koffs, mask=s_in[:, None], other=0.0)
        v = tl.load(v_ptr + koffs, mask=s_in[:, None], other=0.0)
        p = tl.where(keep[None, :], tl.exp2(_mm(qs, tl.trans(kn), None, UPCAST) - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), None, UPCAST)
        dq = _mm((p * (dp - delta[:, None])).to(dt), kn, dq, UPCAST)
    dq = _unrotate(dq * sm_scale, qtok, t_ok, cos_ptr, sin_ptr, BLOCK_M, D // 2)
    tl.store(gq_ptr + offs, dq, mask=t_ok[:, None])


@triton.jit
def dit_attention_bwd_dkdv_kernel(
    qs_ptr, kn_ptr, v_ptr, cos_ptr, sin_ptr, kmask_ptr, gate_ptr, dout_ptr, lse_ptr, delta_ptr, gk_ptr, dv_ptr,
    Tq, Tk, Hq, Hkv, GROUP,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE_K: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_GATE: tl.constexpr, UPCAST: tl.constexpr,
):
    """dv, and gk = d loss / d (k before RoPE) (fp32 scratch, or dk itself when k has no LayerNorm), for
    one k tile of one kv head: the sum over its group's q heads runs inside the program."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    dt = qs_ptr.dtype.element_ty
    d = tl.arange(0, D)
    s_idx = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s_in = s_idx < Tk
    ktok = b * Tk + s_idx
    keep = s_in
    if HAS_MASK:
        keep = keep & (tl.load(kmask_ptr + ktok, mask=s_in, other=0) != 0)
    koffs = ktok[:, None] * (Hkv * D) + hk * D + d[None, :]
    kn = tl.load(kn_ptr + koffs, mask=s_in[:, None], other=0.0)
    v = tl.load(v_ptr + koffs, mask=s_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        tg = 1.0
        if HAS_GATE:
            tg = _tanh(tl.load(gate_ptr + h).to(tl.float32))
        for m0 in range(0, Tq, BLOCK_M):
            t = m0 + tl.arange(0, BLOCK_M)
            t_ok = t < Tq
            qoffs = (b * Tq + t)[:, None] * (Hq * D) + h * D + d[None, :]
            qs = tl.load(qs_ptr + qoffs, mask=t_ok[:, None], other=0.0)
            do = (tl.load(dout_ptr + qoffs, mask=t_ok[:, None], other=0.0).to(tl.float32) * tg).to(dt)
            row = (b * Hq + h) * Tq + t
            lse2 = tl.load(lse_ptr + row, mask=t_ok, other=float("inf")) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
            delta = tl.load(delta_ptr + row, mask=t_ok, other=0.0)
            p = tl.where(keep[None, :], tl.exp2(_mm(qs, tl.trans(kn), None, UPCAST) - lse2[:, None]), 0.0)
            dv = _mm(tl.trans(p.to(dt)), do, dv, UPCAST)
            dp = _mm(do, tl.trans(v), None, UPCAST)
            dk = _mm(tl.trans((p * (dp - delta[:, None])).to(dt)), qs, dk, UPCAST)
    dk = dk * 0.6931471805599453  # qs carries log2(e) / sqrt(D); the chain rule wants 1 / sqrt(D)
    if ROPE_K:
        dk = _unrotate(dk, ktok, s_in, cos_ptr, sin_ptr, BLOCK_N, D // 2)
    tl.store(gk_ptr + koffs, dk.to(gk_ptr.dtype.element_ty), mask=s_in[:, None])
    tl.store(dv_ptr + koffs, dv.to(dv_ptr.dtype.element_ty), mask=s_in[:, None])


@triton.jit
def dit_attention_ln_bwd_kernel(
    gy_ptr, x_ptr, stat_ptr, w_ptr, dx_ptr, dw_part_ptr, db_part_ptr, rows, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """LayerNorm backward over whole token rows (N = H*D): dx from gy = d loss / d LayerNorm(x), and
    this program's partial sums of dweight = sum gy * xhat and dbias = sum gy."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(rows, BLOCK_M), nprog):
        row = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = row[:, None] * N + col[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0)
        mean = tl.load(stat_ptr + 2 * row, mask=row_ok, other=0.0)
        rstd = tl.load(stat_ptr + 2 * row + 1, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = gy * w[None, :]
        c1 = tl.sum(g, axis=1) / N
        c2 = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(gy * xhat, axis=0)
        db += tl.sum(gy, axis=0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + col, dw, mask=col_ok)
    tl.store(db_part_ptr + pid.to(tl.int64) * N + col, db, mask=col_ok)


def check_head_dim(d: int) -> None:
    if d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"dit_attention (Triton face): head dim D must be a power of two from 16 to 128, got {d}")


# (kind, fp32?, D <= 64?) -> (BLOCK_M, BLOCK_N, num_warps) on GPUs, each checked spill-free for both
# sm_80 and sm_90 by benchmarks/gpu_static_report.py (sm_80's mma keeps more in registers than wgmma).
# 16-bit: 64 query rows (one wgmma warpgroup tile) where it fits. fp32 dots run as three TF32 passes
# whose split operands take three times the registers: smaller tiles.
_GPU_BLOCKS = {
    ("fwd", False, True): (64, 64, 4), ("fwd", False, False): (64, 32, 8),
    ("dq", False, True): (64, 64, 4), ("dq", False, False): (64, 32, 4),
    ("dkdv", False, True): (32, 64, 4), ("dkdv", False, False): (32, 64, 8),
    ("fwd", True, True): (64, 16, 4), ("fwd", True, False): (32, 16, 4),
    ("dq", True, True): (64, 16, 4), ("dq", True, False): (16, 32, 4),
    ("dkdv", True, True): (16, 32, 4), ("dkdv", True, False): (16, 16, 8),
}


def attention_blocks(kind: str, t_q: int, t_k: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M queries, BLOCK_N keys, num_warps) for kind fwd | dq | dkdv. A long 16-bit forward at
    D=64 gets 128 query rows over 8 warps (half the K/V reloads). The interpreter pays per program and
    loop step: one tile per sequence (up to 128)."""
    if interpreting():
        return (max(16, min(triton.next_power_of_2(t_q), 128)), max(16, min(triton.next_power_of_2(t_k), 128)), 4)
    f32 = dtype == torch.float32
    if kind == "fwd" and not f32 and t_q > 64 and d <= 64:
        return 128, 64, 8
    return _GPU_BLOCKS[(kind, f32, d <= 64)]


def pre_block_t(t_q: int, d: int) -> int:
    """Query rows per step of the backward's pre kernel (whole heads of D channels per row)."""
    return min(triton.next_power_of_2(t_q), max(1, tile_elements() // d))


def prep_block_t(tokens: int, d: int) -> int:
    """Tokens per program of the prep kernel (one head of D channels each)."""
    return min(triton.next_power_of_2(tokens), max(16, tile_elements() // d))


def _stats(x: torch.Tensor) -> torch.Tensor:
    """(tokens, 2) fp32 mean and rstd of each token of x (B, T, H, D) over H*D."""
    b, t, h, d = x.shape
    rows, n = b * t, h * d
    stat = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
    if rows:
        block_m, block_n = row_blocks(n)
        block_m = min(block_m, triton.next_power_of_2(rows))
        dit_attention_stats_kernel[(triton.cdiv(rows, block_m),)](
            x, stat, rows, n, LN_EPS, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
    return stat


def _ln_bwd(gy: torch.Tensor, x: torch.Tensor, stat: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor,
            dweight: torch.Tensor, dbias: torch.Tensor) -> None:
    b, t, h, d = x.shape
    rows, n = b * t, h * d
    if rows == 0:
        dweight.zero_()
        dbias.zero_()
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    nprog = persistent_programs(x.device, triton.cdiv(rows, block_m))
    part = torch.empty((2, nprog, n), dtype=torch.float32, device=x.device)
    dit_attention_ln_bwd_kernel[(nprog,)](gy, x, stat, weight, dx, part[0], part[1], rows, n,
                                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
    sum_partials(part[0:1], dweight.view(1, n))
    sum_partials(part[1:2], dbias.view(1, n))


def dit_attention_fwd(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, residual, rope_k,
                      out, lse, out_ungated) -> None:
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    check_head_dim(d)
    if b * tq == 0:
        return
    qstat = _stats(q)
    kstat = _stats(k) if k_weight is not None else qstat
    block_m, block_n, warps = attention_blocks("fwd", tq, tk, d, q.dtype)
    # Absent inputs are never read (their constexpr flag is off); q stands in for their pointer.
    dit_attention_fwd_kernel[(triton.cdiv(tq, block_m), b * hq)](
        q, k, v, q_weight, q_bias, _or(k_weight, q), _or(k_bias, q), cos, sin, qstat, kstat,
        _or(key_mask, q, torch.uint8), _or(gate, q), _or(residual, q), out, lse, _or(out_ungated, q),
        tq, tk, hq, hkv, hq // hkv, LOG2E / math.sqrt(d),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, K_NORM=k_weight is not None, ROPE_K=bool(rope_k),
        HAS_MASK=key_mask is not None, HAS_GATE=gate is not None, HAS_RES=residual is not None,
        WRITE_O=out_ungated is not None, UPCAST=interpreting(), F32_OPERANDS=_f32_operands(q), num_warps=warps,
    )


def dit_attention_bwd(dout, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, key_mask, gate, rope_k,
                      out_ungated, lse, dq, dk, dv, dq_weight, dq_bias, dk_weight, dk_bias, dgate) -> None:
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    check_head_dim(d)
    if b * tq == 0:  # no query: every gradient is zero
        for t in (dk, dv, dq_weight, dq_bias, dk_weight, dk_bias, dgate):
            if t is not None:
                t.zero_()
        return
    qstat = _stats(q)
    kstat = _stats(k) if k_weight is not None else qstat
    delta = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    dit_attention_bwd_pre_kernel[(hq,)](
        dout, out_ungated, _or(gate, q), delta, _or(dgate, delta), b, tq, hq,
        D=d, BLOCK_T=pre_block_t(tq, d),
        HAS_GATE=gate is not None, num_warps=4,
    )
    # The dot operands, normalised and rotated once (q also scaled): rounded to the input dtype as the
    # forward rounds them, kept fp32 where the interpreter cannot round to bf16.
    op_dtype = torch.float32 if _f32_operands(q) else q.dtype
    qk_scale = LOG2E / math.sqrt(d)
    qs = _prep(q, qstat, q_weight, q_bias, cos, sin, True, True, qk_scale, op_dtype)
    kn = k if k_weight is None and not rope_k and op_dtype == k.dtype else \
        _prep(k, kstat, k_weight, k_bias, cos, sin, k_weight is not None, bool(rope_k), 1.0, op_dtype)
    inputs = (qs, kn, v, cos, sin, _or(key_mask, q, torch.uint8), _or(gate, q), dout, lse, delta)
    flags = dict(HAS_MASK=key_mask is not None, HAS_GATE=gate is not None, UPCAST=interpreting())

    gq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    block_m, block_n, warps = attention_blocks("dq", tq, tk, d, q.dtype)
    dit_attention_bwd_dq_kernel[(triton.cdiv(tq, block_m), b * hq)](
        *inputs, gq, tq, tk, hq, hkv, hq // hkv, 1.0 / math.sqrt(d),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **flags)

    gk = torch.empty(k.shape, dtype=torch.float32, device=k.device) if k_weight is not None else dk
    if tk:
        block_m, block_n, warps = attention_blocks("dkdv", tq, tk, d, q.dtype)
        dit_attention_bwd_dkdv_kernel[(triton.cdiv(tk, block_n), b * hkv)](
            *inputs, gk, dv, tq, tk, hq, hkv, hq // hkv,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, ROPE_K=bool(rope_k), num_warps=warps, **flags)

    _ln_bwd(gq, q, qstat, q_weight, dq, dq_weight, dq_bias)
    if k_weight is not None:
        _ln_bwd(gk, k, kstat, k_weight, dk, dk_weight, dk_bias)


def _prep(x, stat, weight, bias, cos, sin, norm: bool, rope: bool, scale: float, dtype: torch.dtype) -> torch.Tensor:
    b, t, h, d = x.shape
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if b * t == 0:
        return out
    block_t = prep_block_t(b * t, d)
    dit_attention_prep_kernel[(triton.cdiv(b * t, block_t), h)](
        x, stat, _or(weight, x), _or(bias, x), cos, sin, out, b * t, h, scale,
        D=d, BLOCK_T=block_t, NORM=norm, ROPE=rope, num_warps=num_warps_for(block_t * d))
    return out


def _f32_operands(q: torch.Tensor) -> bool:
    return interpreting() and q.dtype == torch.bfloat16


def _or(t: torch.Tensor | None, stand_in: torch.Tensor, view_as: torch.dtype | None = None) -> torch.Tensor:
    """t (viewed as view_as: Triton reads the bool mask as bytes), or the stand-in pointer when absent."""
    if t is None:
        return stand_in
    return t.view(view_as) if view_as is not None else t
