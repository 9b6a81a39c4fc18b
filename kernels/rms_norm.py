"""RMSNorm Triton kernels: the Triton face of blip3o_fast.ops.rms_norm (contract in its docstring).

Forward: each program normalises BLOCK_M whole rows held in registers (BLOCK_N = next pow2 of N),
math in fp32, one rounding at the store. The same two kernels serve ops.residual_rms_norm
(kernels/residual_rms_norm.py) with HAS_RESIDUAL set: the residual add before the norm, its gradient
added to dx. Backward: each of a fixed number of programs walks a fixed
set of row blocks, writes dx, and keeps a private fp32 partial of dweight; a second kernel sums the
partials in a fixed order, so dweight is bit-identical run to run (no float atomics).
The launch heuristics below (tile size, warps, persistent grid, sum_partials) are shared by the
other kernels/ modules. Rows are held whole in registers: fine to N = 16K, far above the model's 3584.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def row_tile(base, blk, rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row block `blk` of the `rows` rows from row `base` of a row-major (*, N) matrix, whole rows (columns
    tl.arange(0, BLOCK_N)): the rows' indices (int64), which of them exist, the tile's mask and offsets."""
    t = tl.arange(0, BLOCK_M).to(tl.int64) + blk * BLOCK_M
    col = tl.arange(0, BLOCK_N)
    t_ok = t < rows
    row = base + t
    return row, t_ok, t_ok[:, None] & (col < N)[None, :], row[:, None] * N + col[None, :]


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, rstd_ptr, rows, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """HAS_RESIDUAL (ops.residual_rms_norm): x + r is rounded to the storage dtype, stored at s and
    normalised as rounded; otherwise r_ptr and s_ptr are not touched."""
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    row, row_ok, mask, offs = row_tile(0, tl.program_id(0), rows, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)  # the new residual stream, rounded once
        tl.store(s_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr, dres_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, rows, N,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """HAS_RESIDUAL: x is the residual stream s and dres (its incoming gradient) joins dx before the one
    rounding; otherwise dres_ptr is not touched."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < N
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(rows, BLOCK_M), nprog):
        row, row_ok, mask, offs = row_tile(0, blk, rows, N, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_RESIDUAL:
            dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + col, dw, mask=col_ok)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[g, :] = sum over p of part[g, p, :], in a fixed order (grid: groups x column blocks)."""
    grp = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < N
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + (grp * P + p[:, None]) * N + col[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + grp * N + col, tl.sum(acc, axis=0), mask=col_ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_elements() -> int:
    """Elements per program tile: ~4K keeps a GPU row kernel at 8-16 fp32 values per thread; the CPU
    interpreter pays per program, not per element, so it gets far bigger tiles."""
    return 1 << 16 if interpreting() else 4096


def num_warps_for(tile: int) -> int:
    return min(max(tile // 512, 1), 16)


def persistent_programs(device: torch.device, work_items: int) -> int:
    """How many programs a reduction-carrying kernel launches: enough to fill the GPU twice over
    (each one's partial costs a row of scratch), a couple under the interpreter."""
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 2
    return max(1, min(work_items, target))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of n elements held whole in registers."""
    block_n = triton.next_power_of_2(n)
    return max(1, tile_elements() // block_n), block_n


def partial_blocks(p: int, n: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N) for summing p partial rows of n columns."""
    block_n = min(triton.next_power_of_2(n), 1024)
    return max(1, min(triton.next_power_of_2(p), tile_elements() // block_n)), block_n


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> None:
    """out (G, N) fp32 = part (G, P, N) fp32 summed over P."""
    groups, p, n = part.shape
    block_p, block_n = partial_blocks(p, n)
    grid = (groups, triton.cdiv(n, block_n))
    sum_partials_kernel[grid](part, out, p, n, BLOCK_P=block_p, BLOCK_N=block_n,
                              num_warps=num_warps_for(block_p * block_n))


def norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
             new_residual: torch.Tensor | None, rstd: torch.Tensor, eps: float) -> None:
    """The launcher of rms_norm_fwd_kernel for ops.rms_norm (residual None) and ops.residual_rms_norm."""
    rows, n = x.shape
    if rows == 0:
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m),)
    has_residual = residual is not None
    rms_norm_fwd_kernel[grid](x, residual if has_residual else x, weight, out, new_residual if has_residual else out,
                              rstd, rows, n, eps, HAS_RESIDUAL=has_residual, BLOCK_M=block_m, BLOCK_N=block_n,
                              num_warps=num_warps_for(block_m * block_n))


def norm_bwd(dy: torch.Tensor, dres: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
             dx: torch.Tensor, dweight: torch.Tensor) -> None:
    """The launcher of rms_norm_bwd_kernel (dres None: plain RMSNorm) and the deterministic dweight sum."""
    rows, n = x.shape
    if rows == 0:
        dweight.zero_()
        return
    block_m, block_n = row_blocks(n)
    block_m = min(block_m, triton.next_power_of_2(rows))
    nprog = persistent_programs(x.device, triton.cdiv(rows, block_m))
    part = torch.empty((nprog, n), dtype=torch.float32, device=x.device)
    has_residual = dres is not None
    rms_norm_bwd_kernel[(nprog,)](dy, dres if has_residual else dy, x, weight, rstd, dx, part, rows, n,
                                  HAS_RESIDUAL=has_residual, BLOCK_M=block_m, BLOCK_N=block_n,
                                  num_warps=num_warps_for(block_m * block_n))
    sum_partials(part.view(1, nprog, n), dweight.view(1, n))


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, eps: float) -> None:
    norm_fwd(x, None, weight, out, None, rstd, eps)


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dx: torch.Tensor, dweight: torch.Tensor
) -> None:
    norm_bwd(dy, None, x, weight, rstd, dx, dweight)
