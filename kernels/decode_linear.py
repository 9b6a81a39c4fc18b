"""Small-M linear Triton kernels: the Triton face of blip3o_fast.ops.decode_linear (contract in its
docstring). Decode multiplies a few rows by every weight matrix, so the time is the weight's read:
each program owns BLOCK_N weight rows and one K split, streams them once with 16-byte loads along K,
and multiplies them with all (up to BLOCK_M) rows of x.

  M == 1   GEMV: a [BLOCK_N, BLOCK_K] fp32 accumulator of w * x, summed across K once at the end (no
           reduction inside the loop).
  M >= 2   tl.dot(w [BLOCK_N, BLOCK_K], x^T [BLOCK_K, BLOCK_M]), x padded to BLOCK_M >= 16 rows (the
           tensor cores' free rows: the weight read is the cost). fp32 runs the dot in IEEE fp32.
Split-K: when the weight has too few row blocks to fill the GPU (N = 896 is 14 blocks of 64), K is cut
into splits whose fp32 partials (SPLIT, M, N) are summed in a fixed order by a second kernel, which adds
the bias and rounds once (deterministic, no atomics). One split writes out directly.
Under the interpreter bf16 dots run in fp32 (UPCAST: its bf16 dot is wrong; reference/environment.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import interpreting

GEMV_BLOCKS = (16, 256, 4)  # M == 1: (BLOCK_N, BLOCK_K, num_warps); 32 fp32 accumulators a thread
DOT_BLOCKS = (64, 64, 4)  # M >= 2: (BLOCK_N, BLOCK_K, num_warps); BLOCK_M = M padded to 16..64
MAX_BLOCK_M = 64
MAX_SPLITS = 32
REDUCE_BLOCK = 256


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_blocks(m: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for m rows of x. The interpreter pays per program and
    loop step: big tiles there."""
    block_m = 1 if m == 1 else max(16, min(triton.next_power_of_2(m), MAX_BLOCK_M))
    if interpreting():
        return block_m, 128, max(16, min(triton.next_power_of_2(k), 128)), 4
    block_n, block_k, warps = GEMV_BLOCKS if block_m == 1 else DOT_BLOCKS
    return block_m, block_n, block_k, warps


def num_splits(n_programs: int, k_blocks: int, device: torch.device) -> int:
    """K splits so that about four programs run per SM (one per CPU worker under the interpreter)."""
    workers = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return max(1, min(-(-workers // max(1, n_programs)), k_blocks, MAX_SPLITS))


@triton.jit
def decode_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    k_idx = tl.arange(0, BLOCK_K)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + k_idx
            k_ok = kk < k_end
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            xv = tl.load(x_ptr + pid_m.to(tl.int64) * K + kk, mask=k_ok, other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)[:, None]  # [BLOCK_N, 1]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + k_idx
            k_ok = kk < k_end
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                xv = xv.to(tl.float32)
            acc = tl.dot(w, tl.trans(xv), acc, input_precision="ieee")
    offs = m.to(tl.int64)[None, :] * N + n[:, None]  # out[m, n] from acc[n, m]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_s.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def decode_linear_reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum over splits of part[s, m, n] (in split order) + bias[n], rounded once."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M * N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * M * N + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return
    block_m, block_n, block_k, warps = decode_blocks(m, k)
    n_blocks, m_blocks = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    k_blocks = max(1, triton.cdiv(k, block_k))
    splits = num_splits(n_blocks * m_blocks, k_blocks, x.device)
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = max(1, triton.cdiv(k, k_per_split))  # no empty split
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    b = bias if bias is not None else out  # never read when HAS_BIAS is off
    upcast = interpreting() and x.dtype == torch.bfloat16
    decode_linear_kernel[(n_blocks, splits, m_blocks)](
        x, weight, b, out, part, m, n, k, k_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        UPCAST=upcast, num_warps=warps,
    )
    if splits > 1:
        decode_linear_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            part, b, out, m, n, splits, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )
