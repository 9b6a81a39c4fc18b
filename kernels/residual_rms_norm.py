"""Residual add + RMSNorm Triton kernels: the Triton face of blip3o_fast.ops.residual_rms_norm (contract in
its docstring). Same tiling as kernels/rms_norm.py (BLOCK_M whole rows in registers): the forward
rounds x + residual to the storage dtype, stores it, and normalises the rounded row; the backward adds
dres to the norm's dx before its one rounding and keeps per-program fp32 dweight partials, summed in
a fixed order by rms_norm.sum_partials (deterministic, no float atomics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, persistent_programs, row_blocks, sum_partials


@triton.jit
def residual_rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, rstd_ptr, rows, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    col_ok = col < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = row[:, None] * N + col[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(s_ptr.dtype.element_ty)  # the new residual stream, rounded once
    tl.store(s_ptr + offs, s, mask=mask)
    sf = s.to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=1) / N + eps)
    y = sf * rstd[:, None] * w[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def residual_rms_norm_bwd_kernel(
    dy_ptr, dres_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_part_ptr, rows, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(rows, BLOCK_M), nprog):
        row = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = row[:, None] * N + col[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dres = tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = s * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        ds = dres + rstd[:, None] * (g - xhat * c[:, None])
        tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + col, dw, mask=col_ok)


def residual_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, new_residual: torch.Tensor,
    rstd: torch.Tensor, eps: float,
) -> None:
    rows, n = x.shape
    if rows == 0:
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m),)
    residual_rms_norm_fwd_kernel[grid](x, residual, weight, out, new_residual, rstd, rows, n, eps, BLOCK_M=block_m,
                                       BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))


def residual_rms_norm_bwd(
    dy: torch.Tensor, dres: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, ds: torch.Tensor,
    dweight: torch.Tensor,
) -> None:
    rows, n = s.shape
    if rows == 0:
        dweight.zero_()
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    nprog = persistent_programs(s.device, triton.cdiv(rows, block_m))
    part = torch.empty((nprog, n), dtype=torch.float32, device=s.device)
    residual_rms_norm_bwd_kernel[(nprog,)](dy, dres, s, weight, rstd, ds, part, rows, n, BLOCK_M=block_m,
                                           BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
    sum_partials(part.view(1, nprog, n), dweight.view(1, n))
