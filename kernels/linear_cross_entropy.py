"""Fused linear + cross-entropy Triton kernels: the Triton face of blip3o_fast.ops.linear_cross_entropy
(contract in its docstring). Logit tiles come from tl.dot over H in BLOCK_K steps and live only in
registers; the (N, V) logits are never written.

Forward, two launches:
  fwd      one program per (BLOCK_M rows, vocab split): walks its split's BLOCK_V columns with an online
           log-sum-exp in base 2 and picks up the target logit where the target's column passes. The
           split over the vocabulary fills the GPU when N is short (2048 tokens are 16 row blocks).
  combine  per row, merges the splits' (max, sum, picked) into lse and the loss (0 on ignored rows).
Backward, both recomputing the logit tile and dlogits = (exp(logit - lse) - onehot) * dloss_row:
  dh       one program per BLOCK_M rows, owning them: over every vocab block, dH[rows] += dlogits @ W_blk,
           added BLOCK_K columns at a time into an fp32 accumulator in global memory (a row block's dH
           is far too wide for registers at H = 3584).
  dw       one program per BLOCK_V vocab rows, owning them: over every row block, dW[cols] +=
           dlogits^T @ h_rows, likewise. Owned outputs: no atomics, a fixed order, deterministic.
fp32 inputs accumulate straight into dhidden / dweight; 16-bit ones into fp32 scratch (dweight's a span of
vocab rows at a time, so the scratch stays bounded), rounded once by the launcher's copy.
Dot operands are the input dtype (bf16/fp16 tensor cores); fp32 runs its dots as three TF32 passes (about
fp32 accuracy). Under the interpreter every dot runs in fp32 (UPCAST: its bf16 dot is wrong) and bf16
dlogits stay unrounded (F32_OPERANDS: its bf16 cast truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import interpreting, persistent_programs

# (kind, fp32?) -> (BLOCK_M, BLOCK_V, BLOCK_K, num_warps) on GPUs, each checked spill-free for sm_80 and
# sm_90 by benchmarks/gpu_static_report.py. 16-bit: 128 x 128 logit tiles (wgmma) in the forward; the
# backward also holds the dlogits operand and a BLOCK_K-wide product, so its tiles are smaller. fp32
# (three TF32 passes, split operands take three times the registers): smaller still.
_GPU_BLOCKS = {
    ("fwd", False): (128, 128, 64, 8),
    ("dh", False): (64, 128, 64, 8),
    ("dw", False): (128, 64, 64, 8),
    ("fwd", True): (64, 64, 32, 4),
    ("dh", True): (32, 64, 32, 4),
    ("dw", True): (64, 32, 32, 4),
}
LOG2E = 1.4426950408889634


def lce_blocks(kind: str, dtype: torch.dtype, n: int, h: int, v: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps) for kind fwd | dh | dw. The interpreter pays per program
    and loop step: big tiles, a whole (small) H per step."""
    if interpreting():
        return (max(16, min(triton.next_power_of_2(n), 64)), max(16, min(triton.next_power_of_2(v), 256)),
                max(16, min(triton.next_power_of_2(h), 128)), 4)
    return _GPU_BLOCKS[(kind, dtype == torch.float32)]


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 operands: three TF32 passes keep ~fp32 accuracy (an IEEE fp32 dot spills); 16-bit ignores it.
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, H,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile [BLOCK_A, BLOCK_B] = a[a_idx] . b[b_idx]^T over H: rows of hidden against rows of W
    (or W against hidden for the transposed tile)."""
    k = tl.arange(0, BLOCK_K)
    a_row = a_ptr + a_idx.to(tl.int64)[:, None] * H
    b_row = b_ptr + b_idx.to(tl.int64)[:, None] * H
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + k
        k_ok = kk[None, :] < H
        a = tl.load(a_row + kk[None, :], mask=a_ok[:, None] & k_ok, other=0.0)
        b = tl.load(b_row + kk[None, :], mask=b_ok[:, None] & k_ok, other=0.0)
        acc = _mm(a, tl.trans(b), acc, UPCAST)
    return acc


@triton.jit
def _row_factors(t_ptr, dl_ptr, lse_ptr, rows, row_ok, V, ignore_index):
    """Per row: the target, the incoming gradient g (0 where the row is ignored or past N) and lse in
    base 2 (+inf there, so exp2(logit - lse) is exactly 0)."""
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    active = row_ok & (tgt != ignore_index) & (tgt >= 0) & (tgt < V)
    g = tl.where(active, tl.load(dl_ptr + rows, mask=row_ok, other=0.0), 0.0)
    lse2 = tl.where(active, tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634, float("inf"))
    return tgt, g, lse2


@triton.jit
def _accumulate(acc_ptr, rows, row_ok, kk, k_ok, H, part):
    """acc[rows, kk] += part in fp32 global memory the calling program owns."""
    ptrs = acc_ptr + rows.to(tl.int64)[:, None] * H + kk[None, :]
    m = row_ok[:, None] & k_ok[None, :]
    tl.debug_barrier()  # the previous step's stores of these addresses (other threads') come first
    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + part, mask=m)


@triton.jit
def linear_cross_entropy_fwd_kernel(
    h_ptr, w_ptr, t_ptr, pmax_ptr, psum_ptr, ppick_ptr, N, H, V, V_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(V, v_lo + V_PER_SPLIT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pick = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        s = _logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_K, UPCAST)
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        pick += tl.sum(tl.where(hit, s, 0.0), axis=1)
        s2 = tl.where(col_ok[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))  # finite: every step has a live column
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
    out = split * N + rows
    tl.store(pmax_ptr + out, m_i, mask=row_ok)
    tl.store(psum_ptr + out, l_i, mask=row_ok)
    tl.store(ppick_ptr + out, pick, mask=row_ok)


@triton.jit
def linear_cross_entropy_combine_kernel(
    pmax_ptr, psum_ptr, ppick_ptr, t_ptr, loss_ptr, lse_ptr, N, V, SPLITS, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s = tl.arange(0, BLOCK_S)
    offs = s[:, None] * N + rows[None, :]
    m = (s[:, None] < SPLITS) & row_ok[None, :]
    pm = tl.load(pmax_ptr + offs, mask=m, other=float("-inf"))
    big = tl.max(pm, axis=0)
    big = tl.where(big == float("-inf"), 0.0, big)  # rows past N
    total = tl.sum(tl.load(psum_ptr + offs, mask=m, other=0.0) * tl.exp2(pm - big[None, :]), axis=0)
    lse = (big + tl.log2(tl.where(row_ok, total, 1.0))) * 0.6931471805599453
    pick = tl.sum(tl.load(ppick_ptr + offs, mask=m, other=0.0), axis=0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    active = (tgt != ignore_index) & (tgt >= 0) & (tgt < V)
    tl.store(loss_ptr + rows, tl.where(active, lse - pick, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=row_ok)


@triton.jit
def linear_cross_entropy_bwd_dh_kernel(
    dl_ptr, h_ptr, w_ptr, t_ptr, lse_ptr, acc_ptr, N, H, V, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    F32_OPERANDS: tl.constexpr,
):
    dt = tl.float32 if F32_OPERANDS else w_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tgt, g, lse2 = _row_factors(t_ptr, dl_ptr, lse_ptr, rows, row_ok, V, ignore_index)
    k = tl.arange(0, BLOCK_K)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        s = _logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, BLOCK_M, BLOCK_V, BLOCK_K, UPCAST)
        p = tl.exp2(s * 1.4426950408889634 - lse2[:, None])
        d = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
        d = tl.where(col_ok[None, :], d, 0.0).to(dt)
        w_row = w_ptr + cols.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + k
            k_ok = kk < H
            wb = tl.load(w_row + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            _accumulate(acc_ptr, rows, row_ok, kk, k_ok, H, _mm(d, wb, None, UPCAST))


@triton.jit
def linear_cross_entropy_bwd_dw_kernel(
    dl_ptr, h_ptr, w_ptr, t_ptr, lse_ptr, acc_ptr, N, H, V, V0, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    F32_OPERANDS: tl.constexpr,
):
    """Vocab rows V0 + program * BLOCK_V ...; acc_ptr holds the span's rows from V0 on."""
    dt = tl.float32 if F32_OPERANDS else h_ptr.dtype.element_ty
    local = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = V0 + local
    col_ok = cols < V
    k = tl.arange(0, BLOCK_K)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        tgt, g, lse2 = _row_factors(t_ptr, dl_ptr, lse_ptr, rows, row_ok, V, ignore_index)
        s = _logits(w_ptr, h_ptr, cols, col_ok, rows, row_ok, H, BLOCK_V, BLOCK_M, BLOCK_K, UPCAST)  # [v, m]
        p = tl.exp2(s * 1.4426950408889634 - lse2[None, :])
        d = ((p - tl.where(cols[:, None] == tgt[None, :], 1.0, 0.0)) * g[None, :]).to(dt)
        h_row = h_ptr + rows.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + k
            k_ok = kk < H
            hb = tl.load(h_row + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            _accumulate(acc_ptr, local, col_ok, kk, k_ok, H, _mm(d, hb, None, UPCAST))


def _f32_operands(t: torch.Tensor) -> bool:
    return interpreting() and t.dtype == torch.bfloat16


def fwd_splits(n: int, v: int, block_m: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(vocab splits, columns per split): enough programs to fill the GPU twice over, whole BLOCK_V
    blocks per split and none empty."""
    v_blocks = triton.cdiv(v, block_v)
    want = triton.cdiv(persistent_programs(device, 1 << 30), triton.cdiv(n, block_m))
    per_split = triton.cdiv(v_blocks, max(1, min(v_blocks, want)))
    return triton.cdiv(v_blocks, per_split), per_split * block_v


def combine_blocks(n: int, splits: int) -> tuple[int, int]:
    """(BLOCK_N rows, BLOCK_S splits) of the combine kernel: every split at once, ~2K values a program."""
    block_s = triton.next_power_of_2(splits)
    return max(1, min(triton.next_power_of_2(n), 2048 // block_s)), block_s


def linear_cross_entropy_fwd(hidden, weight, targets, loss, lse, ignore_index) -> None:
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return
    bm, bv, bk, warps = lce_blocks("fwd", hidden.dtype, n, h, v)
    splits, per_split = fwd_splits(n, v, bm, bv, hidden.device)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    linear_cross_entropy_fwd_kernel[(triton.cdiv(n, bm), splits)](
        hidden, weight, targets, part[0], part[1], part[2], n, h, v, per_split,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, UPCAST=interpreting(), num_warps=warps,
    )
    block_n, block_s = combine_blocks(n, splits)
    linear_cross_entropy_combine_kernel[(triton.cdiv(n, block_n),)](
        part[0], part[1], part[2], targets, loss, lse, n, v, splits, ignore_index,
        BLOCK_N=block_n, BLOCK_S=block_s, num_warps=4,
    )


def linear_cross_entropy_bwd(dloss, hidden, weight, targets, lse, dhidden, dweight, ignore_index) -> None:
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = hidden.dtype == torch.float32
    flags = dict(UPCAST=interpreting(), F32_OPERANDS=_f32_operands(hidden))
    if dhidden is not None:
        acc = dhidden.zero_() if f32 else torch.zeros(n, h, dtype=torch.float32, device=hidden.device)
        bm, bv, bk, warps = lce_blocks("dh", hidden.dtype, n, h, v)
        if n > 0:
            linear_cross_entropy_bwd_dh_kernel[(triton.cdiv(n, bm),)](
                dloss, hidden, weight, targets, lse, acc, n, h, v, ignore_index,
                BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, **flags,
            )
        if not f32:
            dhidden.copy_(acc)
    if dweight is not None:
        bm, bv, bk, warps = lce_blocks("dw", hidden.dtype, n, h, v)
        v_blocks = triton.cdiv(v, bv)
        # 16-bit weights: a span of vocab rows at a time through fp32 scratch, one GPU-filling launch each.
        per_launch = v_blocks if f32 else persistent_programs(hidden.device, v_blocks)
        scratch = None if f32 else torch.empty(per_launch * bv, h, dtype=torch.float32, device=hidden.device)
        for b0 in range(0, v_blocks, per_launch):
            v0, v1 = b0 * bv, min(v, (b0 + per_launch) * bv)
            acc = dweight[v0:v1] if f32 else scratch[: v1 - v0]
            acc.zero_()
            if n > 0:
                linear_cross_entropy_bwd_dw_kernel[(triton.cdiv(v1 - v0, bv),)](
                    dloss, hidden, weight, targets, lse, acc, n, h, v, v0, ignore_index,
                    BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, **flags,
                )
            if not f32:
                dweight[v0:v1].copy_(acc)
