"""Flow-matching sampler update Triton kernels: the Triton face of blip3o_fast.ops.flow_step
(contract in its docstring). Elementwise over the B*N latents, BLOCK elements per program; with
the doubled CFG batch element e's unconditional velocity is v[e], its conditional one v[B*N + e].

The exact kernel reproduces the released sampler's roundings (through v's dtype after each
operation) and is compiled with FP fusion off, so no multiply-add becomes an FMA (which would round
once where PyTorch rounds twice). Out may be x and v_save may be v_prev: each element is loaded
before it is stored, by the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, tile_elements


@triton.jit
def flow_step_kernel(
    x_ptr, v_ptr, out_ptr, vp_ptr, vs_ptr, total, dt, g, c_prev,
    GUIDED: tl.constexpr, HAS_PREV: tl.constexpr, HAS_SAVE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    vc = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if GUIDED:
        vcond = tl.load(v_ptr + total + offs, mask=ok, other=0.0).to(tl.float32)
        vc = vc + g * (vcond - vc)
    xn = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + dt * vc
    if HAS_PREV:
        xn = xn + c_prev * tl.load(vp_ptr + offs, mask=ok, other=0.0)
    if HAS_SAVE:
        tl.store(vs_ptr + offs, vc, mask=ok)
    tl.store(out_ptr + offs, xn.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def flow_step_exact_kernel(x_ptr, v_ptr, out_ptr, total, dt, g, GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    dtype = v_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    vc = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if GUIDED:
        vcond = tl.load(v_ptr + total + offs, mask=ok, other=0.0).to(tl.float32)
        d = (vcond - vc).to(dtype).to(tl.float32)
        vc = (vc + (g * d).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    step = (dt * vc).to(dtype).to(tl.float32)  # dt arrives as PyTorch on v's device sees it (the launcher)
    xn = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + step
    tl.store(out_ptr + offs, xn.to(out_ptr.dtype.element_ty), mask=ok)


def flow_block(total: int) -> int:
    return min(tile_elements(), triton.next_power_of_2(max(total, 1)))


def flow_step(
    x: torch.Tensor, v: torch.Tensor, out: torch.Tensor, v_prev: torch.Tensor | None, v_save: torch.Tensor | None,
    dt: float, guidance: float, c_prev: float, exact: bool,
) -> None:
    b, n = x.shape
    total = b * n
    if total == 0:
        return
    guided = v.shape[0] == 2 * b
    block = flow_block(total)
    grid = (triton.cdiv(total, block),)
    warps = num_warps_for(block)
    if exact:
        # The released step's dt is a float32 0-dim CPU tensor: PyTorch's CPU kernels round it to v's
        # dtype before the product, its CUDA kernels keep it in fp32 (CPU tensors: the interpreter).
        dt_model = torch.tensor(dt, dtype=torch.float32).to(v.dtype).item() if v.device.type == "cpu" else dt
        flow_step_exact_kernel[grid](x, v, out, total, dt_model, guidance, GUIDED=guided, BLOCK=block, num_warps=warps,
                                     enable_fp_fusion=False)
        return
    flow_step_kernel[grid](
        x, v, out, v_prev if v_prev is not None else x, v_save if v_save is not None else out, total, dt, guidance,
        c_prev, GUIDED=guided, HAS_PREV=v_prev is not None, HAS_SAVE=v_save is not None, BLOCK=block,
        num_warps=warps,
    )
