"""adaLN RMSNorm-zero modulation Triton kernels: the Triton face of blip3o_fast.ops.rms_norm_modulate
(contract in its docstring). y = x * rstd * weight * (1 + scale[b]).

Forward: like RMSNorm, BLOCK_M whole rows per program; a block may straddle batches, so each row
gathers its own scale row. Backward: programs are laid out (batch, split); each walks a fixed set
of row blocks inside one batch and keeps private fp32 partials of dscale[b] and dweight, which
sum_partials then adds in a fixed order (deterministic, no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, persistent_programs, row_blocks, row_tile, sum_partials


@triton.jit
def rms_norm_modulate_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, rstd_ptr, rows, T, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    row, row_ok, mask, offs = row_tile(0, tl.program_id(0), rows, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + (row // T)[:, None] * N + col[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :] * (1.0 + s)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def rms_norm_modulate_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, scale_ptr, rstd_ptr, dx_ptr, dw_part_ptr, ds_part_ptr, T, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    one_plus_s = 1.0 + tl.load(scale_ptr + b * N + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ds = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(split, tl.cdiv(T, BLOCK_M), nsplit):
        row, t_ok, mask, offs = row_tile(b * T, blk, T, N, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=t_ok, other=0.0)
        xhat = x * rstd[:, None]
        ds += tl.sum(dy * xhat, axis=0)
        dn = dy * one_plus_s[None, :]
        dw += tl.sum(dn * xhat, axis=0)
        g = dn * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = b * nsplit + split
    tl.store(dw_part_ptr + part * N + col, dw, mask=col_ok)
    # dscale[b] = sum_t dy * xhat * weight: weight is constant over t, so it is applied once here.
    tl.store(ds_part_ptr + part * N + col, ds * w, mask=col_ok)


def rms_norm_modulate_fwd(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, eps: float
) -> None:
    _, t, n = x.shape
    rows = x.numel() // n if n else 0
    if rows == 0:
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m),)
    rms_norm_modulate_fwd_kernel[grid](x, weight, scale, out, rstd, rows, t, n, eps, BLOCK_M=block_m,
                                       BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))


def rms_norm_modulate_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor,
    dx: torch.Tensor, dweight: torch.Tensor, dscale: torch.Tensor,
) -> None:
    b, t, n = x.shape
    if b * t == 0:
        dweight.zero_()
        dscale.zero_()
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(t))
    blocks_per_batch = triton.cdiv(t, block_m)
    nsplit = max(1, persistent_programs(x.device, b * blocks_per_batch) // b)
    dw_part = torch.empty((b * nsplit, n), dtype=torch.float32, device=x.device)
    ds_part = torch.empty((b, nsplit, n), dtype=torch.float32, device=x.device)
    rms_norm_modulate_bwd_kernel[(b, nsplit)](
        dy, x, weight, scale, rstd, dx, dw_part, ds_part, t, n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n),
    )
    sum_partials(dw_part.view(1, b * nsplit, n), dweight.view(1, n))
    sum_partials(ds_part, dscale)
