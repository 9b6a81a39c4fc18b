"""Token sampling Triton kernel: the Triton face of blip3o_fast.ops.sample_tokens (semantics and contract
in its docstring; the noise, hash and plog are csrc/include/blip3o/sample_tokens.h, restated here op for op).

One program per row, looping over BLOCK-wide vocabulary tiles; no sort and no scratch memory:
  1. raw max (lowest index) and log-sum-exp: greedy rows stop here.
  2. top-k / top-p thresholds by a bisection over the row's values, one tile loop per step: each step
     counts (and for top-p sums exp(s - max) over) the values above a pivot, and finds the largest value
     at or below it, so the rule is evaluated at a value present in the row and the interval snaps to
     present values; it ends when no value lies strictly between the bounds. Pivots are value midpoints
     (or max - 16, 32, ... while no lower bound is known), falling back to midpoints of the ordered
     uint32 keys, which always split the interval: a few dozen steps at most, ~10-20 on LM logits.
  3. Gumbel-max over the kept tiles; a tile whose best kept value cannot reach the best score so far
     even with the largest possible noise (or lies kPruneSpan below the max) skips the hash and logs.
Launched with enable_fp_fusion=False so plog's IEEE ops stay unfused, as on every other face.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import interpreting

_C3 = tl.constexpr(float.fromhex("0x1.555556p-2"))
_C5 = tl.constexpr(float.fromhex("0x1.99999ap-3"))
_C7 = tl.constexpr(float.fromhex("0x1.24924ap-3"))
_C9 = tl.constexpr(float.fromhex("0x1.c71c72p-4"))
_LN2_HI = tl.constexpr(float.fromhex("0x1.63p-1"))
_LN2_LO = tl.constexpr(float.fromhex("-0x1.bd0106p-13"))
_GUMBEL_MAX = tl.constexpr(16.64)  # above every value the noise takes (16.6356)
_PRUNE_SPAN = tl.constexpr(20.5)  # kPruneSpan / kPruneMaxAbs of the header
_PRUNE_MAX_ABS = tl.constexpr(65536.0)
_MAX_STEPS = tl.constexpr(160)  # a guard only: a search takes at most ~70 steps (value then key bisection)


@triton.jit
def _mix(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _plog(x):
    b = x.to(tl.uint32, bitcast=True)
    mant = b & 0x7FFFFF
    high = mant > 0x3504F3
    m = (mant | tl.where(high, 0x3F000000, 0x3F800000).to(tl.uint32)).to(tl.float32, bitcast=True)
    e = ((b >> 23).to(tl.int32) - tl.where(high, 126, 127)).to(tl.float32)
    s = tl.math.div_rn(m - 1.0, m + 1.0)
    z = s * s
    p = _C9 * z
    p = (p + _C7) * z
    p = (p + _C5) * z
    p = (p + _C3) * z
    r = s * p + s
    return e * _LN2_HI + (e * _LN2_LO + (r + r))


@triton.jit
def _gumbel(key, idx):
    bits = _mix(key ^ _mix(idx))
    u = (((bits >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    return -_plog(-_plog(u))


@triton.jit
def _key(s):
    """Ordered uint32 key of fp32 values (-0 as +0)."""
    b = s.to(tl.uint32, bitcast=True)
    b = tl.where(b == 0x80000000, 0, b).to(tl.uint32)
    return tl.where((b & 0x80000000) != 0, ~b, b | 0x80000000)


@triton.jit
def _key_value(k):
    b = tl.where((k & 0x80000000) != 0, k & 0x7FFFFFFF, ~k).to(tl.uint32)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _search(base, V, temp, row_max, k, thr, lo_key, hi_key, BLOCK: tl.constexpr, MASS: tl.constexpr):
    """The smallest present key passing the rule (count(s > v) < k, or with MASS sum(exp(s - max) : s > v) < thr).
    Invariant: keys <= lo_key fail, hi_key is present and passes; c_lo / c_hi count keys > lo_key / >= hi_key."""
    cols = tl.arange(0, BLOCK)
    c_lo = 1
    c_hi = 0
    width = 16.0
    steps = 0
    while (c_lo != c_hi) & (steps < _MAX_STEPS):
        hi_v = _key_value(hi_key)
        lo_v = _key_value(lo_key)
        floor = lo_key == 0
        mid_v = tl.where(floor, hi_v - width, lo_v * 0.5 + hi_v * 0.5)
        near = tl.where(floor, width <= 128.0, hi_v - lo_v <= 128.0)
        width = tl.where(floor, width * 2.0, width)
        cand = _key(mid_v)
        inside = near & (cand > lo_key) & (cand < hi_key)
        mk = tl.where(inside, cand, lo_key + (hi_key - lo_key) // 2)
        c_m = 0
        n_lo = 0
        n_hi = 0
        mass = 0.0
        q = tl.zeros((), dtype=tl.uint32)
        cq = 0
        for start in range(0, V, BLOCK):
            idx = start + cols
            ok = idx < V
            s = tl.math.div_rn(tl.load(base + idx, mask=ok, other=0.0).to(tl.float32), temp)
            kk = _key(s)
            gt = ok & (kk > mk)
            c_m += tl.sum(gt.to(tl.int32), 0)
            n_lo += tl.sum((ok & (kk > lo_key)).to(tl.int32), 0)
            n_hi += tl.sum((ok & (kk >= hi_key)).to(tl.int32), 0)
            if MASS:
                mass += tl.sum(tl.where(gt, tl.exp(s - row_max), 0.0), 0)
            le = ok & (kk <= mk)
            tq = tl.max(tl.where(le, kk, 0).to(tl.uint32), 0)
            tc = tl.sum((le & (kk == tq)).to(tl.int32), 0)
            cq = tl.where(tq > q, tc, tl.where(tq == q, cq + tc, cq))
            q = tl.maximum(q, tq)
        if MASS:
            passes = mass < thr
        else:
            passes = c_m < k
        move_hi = (cq > 0) & (q > lo_key) & passes
        hi_key = tl.where(move_hi, q, hi_key)
        c_hi = tl.where(move_hi, c_m + cq, n_hi)
        lo_key = tl.where(move_hi, lo_key, mk)
        c_lo = tl.where(move_hi, n_lo, c_m)
        steps += 1
    return hi_key


@triton.jit
def sample_tokens_kernel(
    l_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, ctr_ptr, tok_ptr, lp_ptr, V,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = l_ptr + row * V
    cols = tl.arange(0, BLOCK)
    # 1. raw max (lowest index) and per-lane online sum of exp for the log-softmax normaliser
    best = -float("inf")
    best_i = 0
    m_lane = tl.full((BLOCK,), -float("inf"), tl.float32)
    s_lane = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        tmax = tl.max(x, 0)
        targ = tl.argmax(x, 0, tie_break_left=True)
        best_i = tl.where(tmax > best, start + targ, best_i)
        best = tl.maximum(best, tmax)
        m_new = tl.maximum(m_lane, x)
        m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)  # all -inf so far: exps of -inf, not of NaN
        s_lane = s_lane * tl.exp(m_lane - m_ref) + tl.exp(x - m_ref)
        m_lane = m_new
    log_z = best + tl.log(tl.sum(s_lane * tl.exp(m_lane - best), 0))

    temp = tl.load(temp_ptr + row)
    token = best_i
    if temp > 0.0:
        k = tl.load(topk_ptr + row)
        p = tl.load(topp_ptr + row)
        row_max = tl.math.div_rn(best, temp)  # x / temp is monotone: the raw max is the scaled max
        max_key = _key(row_max)
        tau_key = tl.zeros((), dtype=tl.uint32)
        # 2. the kept set's threshold key: top-k, then top-p among the top-k survivors
        if (k > 0) & (k < V):
            tau_key = _search(base, V, temp, row_max, k, 0.0, tl.zeros((), dtype=tl.uint32), max_key,
                              BLOCK, False)
        if p < 1.0:
            z = 0.0
            for start in range(0, V, BLOCK):
                idx = start + cols
                ok = idx < V
                s = tl.math.div_rn(tl.load(base + idx, mask=ok, other=0.0).to(tl.float32), temp)
                z += tl.sum(tl.where(ok & (_key(s) >= tau_key), tl.exp(s - row_max), 0.0), 0)
            lo = tl.where(tau_key > 0, tau_key - 1, 0).to(tl.uint32)
            tau_key = _search(base, V, temp, row_max, 0, p * z, lo, max_key, BLOCK, True)
        # 3. Gumbel-max over the kept tokens (lowest index on ties)
        seed = tl.load(seed_ptr + row)
        ctr = tl.load(ctr_ptr + row)
        h = _mix(seed.to(tl.uint32) ^ 0x9E3779B9)
        h = _mix(h ^ (seed >> 32).to(tl.uint32))
        h = _mix(h ^ ctr.to(tl.uint32))
        rkey = _mix(h ^ (ctr >> 32).to(tl.uint32))
        floor_s = tl.where(tl.abs(row_max) < _PRUNE_MAX_ABS, row_max - _PRUNE_SPAN, -float("inf"))
        g_best = -float("inf")
        g_i = 0
        for start in range(0, V, BLOCK):
            idx = start + cols
            ok = idx < V
            s = tl.math.div_rn(tl.load(base + idx, mask=ok, other=0.0).to(tl.float32), temp)
            kept = ok & (_key(s) >= tau_key) & (s >= floor_s)
            top = tl.max(tl.where(kept, s, -float("inf")), 0)
            if (top + _GUMBEL_MAX >= g_best) & (top > -float("inf")):
                score = tl.where(kept, s + _gumbel(rkey, idx.to(tl.uint32)), -float("inf"))
                tmax = tl.max(score, 0)
                targ = tl.argmax(score, 0, tie_break_left=True)
                g_i = tl.where(tmax > g_best, start + targ, g_i)
                g_best = tl.maximum(g_best, tmax)
        token = g_i
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, tl.load(base + token).to(tl.float32) - log_z)


def sample_block(vocab: int) -> int:
    """Vocabulary tile: 4K values (16 per thread at 8 warps) on GPUs; the interpreter pays per tile step."""
    return min(triton.next_power_of_2(vocab), 1 << 16 if interpreting() else 4096)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
    counters: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
) -> None:
    batch, vocab = logits.shape
    if batch == 0:
        return
    sample_tokens_kernel[(batch,)](logits, temperature, top_k, top_p, seeds, counters, tokens, logprobs, vocab,
                                   BLOCK=sample_block(vocab), num_warps=8, enable_fp_fusion=False)
