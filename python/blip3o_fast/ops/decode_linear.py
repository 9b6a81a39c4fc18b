"""Small-M linear for decode steps: a few rows (the batch being decoded) times every weight matrix.

    decode_linear(x, weight, bias=None, *, backend=None) -> y

  x       (..., K) float32 / bfloat16 / float16; the leading dims are flattened to M rows
  weight  (N, K) in x's dtype and device, contiguous (nn.Linear's layout)
  bias    (N,) in x's dtype, or None
  y       (..., N) = x @ weight^T + bias, accumulated in fp32 and rounded once to x's dtype.
Inference only: there is no backward (the op refuses inputs that require grad while grad mode is on).

Regime: M <= 64 (decode, 1..32 sequences). A GEMM library tiles for large M and is poor at this
shape, where the work is bound by reading the weight once; these kernels stream every weight byte
once per call (once per 64 rows of x) and multiply it with all M rows while it is in registers or
L1. Any M is correct; above ~64 rows a regular matmul (F.linear) is the better tool.

Faces: decode_linear_reference (here: fp32 matmul), csrc/cpu/decode_linear.cpp (row slabs per
thread, AVX2 micro-kernel), kernels/decode_linear.py (Triton, program per block of weight rows),
csrc/cuda/decode_linear.cu (a warp per weight row). The faces sum in different orders: results agree
to fp32 rounding, not bit for bit.
Kernel contract (all faces; every tensor contiguous, one dtype):
  decode_linear(x[M,K], weight[N,K], bias[N]|None, out[M,N])
"""

from __future__ import annotations

import math

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same

KERNEL = "decode_linear"


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: the product in fp32, rounded once to x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("blip3o_fast::decode_linear", mutates_args=())
def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    _, fn = dispatch.kernel_for(KERNEL, x.device, backend or None)
    if fn is None:
        return decode_linear_reference(x, weight, bias)
    out = x.new_empty((x.shape[0], weight.shape[0]))
    fn(x, weight, bias, out)
    return out


@_decode_linear.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N) in x's dtype (module docstring). Meant for
    few rows (M <= 64). `backend`: torch | cpu | triton | cuda (default: by device). Inference only."""
    op = KERNEL
    check_float(op, "x", x)
    check_same(op, "x", x, weight=weight)
    if bias is not None:
        check_same(op, "x", x, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., K), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal weight's K (dim 1 of {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if not weight.is_contiguous():  # a copy of the weight per call would cost more than the product
        raise ValueError(f"{op}: weight must be contiguous (N, K) (nn.Linear's layout); call .contiguous() once")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError(f"{op}: inference only (no backward); call it under torch.no_grad()")
    if dispatch.requested_backend(backend) == "torch":
        return decode_linear_reference(x, weight, bias)
    rows = x.reshape(math.prod(x.shape[:-1]), k).contiguous()  # -1 is ambiguous when K == 0
    b = bias.contiguous() if bias is not None else None
    return dispatch.call(_decode_linear, rows, weight, b, backend or "").view(*x.shape[:-1], n)
