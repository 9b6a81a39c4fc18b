"""Fused DiT block epilogue Triton kernels: the Triton face of blip3o_fast.ops.gated_residual_norm
(contract in its docstring). x_out = x + gate[b] * RMSNorm(y) * y_weight, and with HAS_NEXT also
h = RMSNorm(x_out) * next_weight * (1 + next_scale[b]).

Forward: BLOCK_M whole rows per program held in registers (as rms_norm.py), x_out kept in fp32 for
the second norm. Backward: programs laid out (batch, split) as in rms_norm_modulate.py; within one
batch gate and next_scale are constant, so each program needs only two column sums,
S = sum_t gxo * yhat and Sn = sum_t dh * xohat, from which dgate = S * y_weight,
dy_weight = S * gate[b], dnext_scale = Sn * next_weight and dnext_weight = Sn * (1 + next_scale[b]);
the per-program partials are then summed in a fixed order (deterministic, no float atomics).
Without HAS_NEXT the next-norm pointer arguments are never read: launchers pass stand-ins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, persistent_programs, row_blocks, row_tile, sum_partials


@triton.jit
def gated_residual_norm_fwd_kernel(
    x_ptr, y_ptr, wy_ptr, gate_ptr, wn_ptr, sn_ptr, xo_ptr, h_ptr, ry_ptr, rx_ptr, rows, T, N, eps,
    HAS_NEXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    row, row_ok, mask, offs = row_tile(0, tl.program_id(0), rows, N, BLOCK_M, BLOCK_N)
    boffs = (row // T)[:, None] * N + col[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wy = tl.load(wy_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + boffs, mask=mask, other=0.0).to(tl.float32)
    ry = tl.rsqrt(tl.sum(y * y, axis=1) / N + eps)
    xo = x + g * (y * ry[:, None]) * wy[None, :]
    tl.store(xo_ptr + offs, xo.to(xo_ptr.dtype.element_ty), mask=mask)
    tl.store(ry_ptr + row, ry, mask=row_ok)
    if HAS_NEXT:
        wn = tl.load(wn_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        s = tl.load(sn_ptr + boffs, mask=mask, other=0.0).to(tl.float32)
        rx = tl.rsqrt(tl.sum(xo * xo, axis=1) / N + eps)
        h = xo * rx[:, None] * wn[None, :] * (1.0 + s)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(rx_ptr + row, rx, mask=row_ok)


@triton.jit
def gated_residual_norm_bwd_kernel(
    dxo_ptr, dh_ptr, x_ptr, y_ptr, wy_ptr, gate_ptr, wn_ptr, sn_ptr, ry_ptr, rx_ptr, dx_ptr, dy_ptr,
    dwy_part_ptr, dg_part_ptr, dwn_part_ptr, dsn_part_ptr, T, N,
    HAS_NEXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    wy = tl.load(wy_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b * N + col, mask=col_ok, other=0.0).to(tl.float32)
    acc_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_NEXT:
        wn = tl.load(wn_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        s1 = 1.0 + tl.load(sn_ptr + b * N + col, mask=col_ok, other=0.0).to(tl.float32)
    for blk in range(split, tl.cdiv(T, BLOCK_M), nsplit):
        row, t_ok, mask, offs = row_tile(b * T, blk, T, N, BLOCK_M, BLOCK_N)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ry = tl.load(ry_ptr + row, mask=t_ok, other=0.0)
        yhat = y * ry[:, None]
        gxo = tl.load(dxo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NEXT:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rx = tl.load(rx_ptr + row, mask=t_ok, other=0.0)
            xohat = (x + g[None, :] * yhat * wy[None, :]) * rx[:, None]
            acc_n += tl.sum(dh * xohat, axis=0)
            gh = dh * s1[None, :] * wn[None, :]
            ch = tl.sum(gh * xohat, axis=1) / N
            gxo = gxo + rx[:, None] * (gh - xohat * ch[:, None])
        tl.store(dx_ptr + offs, gxo.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_y += tl.sum(gxo * yhat, axis=0)
        gy = gxo * g[None, :] * wy[None, :]
        cy = tl.sum(gy * yhat, axis=1) / N
        dy = ry[:, None] * (gy - yhat * cy[:, None])
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    part = (b * nsplit + split) * N + col
    tl.store(dwy_part_ptr + part, acc_y * g, mask=col_ok)
    tl.store(dg_part_ptr + part, acc_y * wy, mask=col_ok)
    if HAS_NEXT:
        tl.store(dwn_part_ptr + part, acc_n * s1, mask=col_ok)
        tl.store(dsn_part_ptr + part, acc_n * wn, mask=col_ok)


def fwd_blocks(n: int, rows: int) -> tuple[int, int]:
    block_m, block_n = row_blocks(n)
    return min(block_m, triton.next_power_of_2(max(rows, 1))), block_n


def gated_residual_norm_fwd(
    x: torch.Tensor, y: torch.Tensor, y_weight: torch.Tensor, gate: torch.Tensor,
    next_weight: torch.Tensor | None, next_scale: torch.Tensor | None, x_out: torch.Tensor, h: torch.Tensor | None,
    rstd_y: torch.Tensor, rstd_x: torch.Tensor | None, eps: float,
) -> None:
    b, t, n = x.shape
    rows = b * t
    if rows == 0:
        return
    has_next = next_weight is not None
    block_m, block_n = fwd_blocks(n, rows)
    grid = (triton.cdiv(rows, block_m),)
    gated_residual_norm_fwd_kernel[grid](
        x, y, y_weight, gate,
        next_weight if has_next else y_weight, next_scale if has_next else gate,
        x_out, h if has_next else x_out, rstd_y, rstd_x if has_next else rstd_y,
        rows, t, n, eps, HAS_NEXT=has_next, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps_for(block_m * block_n),
    )


def gated_residual_norm_bwd(
    dxo: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, y_weight: torch.Tensor,
    gate: torch.Tensor, next_weight: torch.Tensor | None, next_scale: torch.Tensor | None, rstd_y: torch.Tensor,
    rstd_x: torch.Tensor | None, dx: torch.Tensor, dy: torch.Tensor, dy_weight: torch.Tensor, dgate: torch.Tensor,
    dnext_weight: torch.Tensor | None, dnext_scale: torch.Tensor | None,
) -> None:
    b, t, n = x.shape
    has_next = next_weight is not None
    grads = [dy_weight, dgate] + ([dnext_weight, dnext_scale] if has_next else [])
    if b * t == 0:
        for g in grads:
            g.zero_()
        return
    block_m, block_n = fwd_blocks(n, t)
    nsplit = max(1, persistent_programs(x.device, b * triton.cdiv(t, block_m)) // b)
    parts = [torch.empty((b, nsplit, n), dtype=torch.float32, device=x.device) for _ in grads]
    dwy_p, dg_p = parts[0], parts[1]
    dwn_p, dsn_p = (parts[2], parts[3]) if has_next else (dwy_p, dg_p)
    gated_residual_norm_bwd_kernel[(b, nsplit)](
        dxo, dh if has_next else dxo, x, y, y_weight, gate,
        next_weight if has_next else y_weight, next_scale if has_next else gate,
        rstd_y, rstd_x if has_next else rstd_y, dx, dy, dwy_p, dg_p, dwn_p, dsn_p, t, n,
        HAS_NEXT=has_next, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n),
    )
    sum_partials(dwy_p.view(1, b * nsplit, n), dy_weight.view(1, n))
    sum_partials(dg_p, dgate)
    if has_next:
        sum_partials(dwn_p.view(1, b * nsplit, n), dnext_weight.view(1, n))
        sum_partials(dsn_p, dnext_scale)
