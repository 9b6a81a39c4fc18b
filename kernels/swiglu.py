"""SwiGLU Triton kernels: the Triton face of blip3o_fast.ops.swiglu (contract in its docstring).

Flat elementwise kernels over n elements, fp32 math, one rounding at each store. Offsets are int64:
an MLP activation at 8192 tokens x 18944 intermediate is near 2^28 elements and grows with batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blip3o_fast.kernels.rms_norm import num_warps_for, tile_elements


@triton.jit
def swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    dup = dy * g * sig
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def swiglu_block(n: int) -> int:
    """A 4K tile on a GPU gives 16 fp32 values (four 16-byte vectors) per thread at 8 warps."""
    return max(16, min(tile_elements(), triton.next_power_of_2(n)))


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    n = gate.numel()
    if n == 0:
        return
    block = swiglu_block(n)
    swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=num_warps_for(block))


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    n = gate.numel()
    if n == 0:
        return
    block = swiglu_block(n)
    swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dgate, dup, n, BLOCK=block,
                                                num_warps=num_warps_for(block))
