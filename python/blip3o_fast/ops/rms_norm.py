"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, rounded once to x's dtype.

Faces: rms_norm_reference (here), csrc/cpu/rms_norm.cpp, kernels/rms_norm.py, csrc/cuda/rms_norm.cu.
Kernel contract (all faces, rows = x.numel() // N, every tensor contiguous):
  rms_norm_fwd(x[rows,N], weight[N], out[rows,N], rstd[rows] fp32, eps)
  rms_norm_bwd(dy[rows,N], x[rows,N], weight[N], rstd[rows] fp32, dx[rows,N], dweight[N] fp32)
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def _reference_fwd(x, weight, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[..., None] * weight.float()).to(x.dtype), rstd


def _reference_bwd(dy, x, weight, rstd):
    xhat = x.float() * rstd[..., None]
    g = dy.float() * weight.float()
    dx = rstd[..., None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dweight


@torch.library.custom_op("blip3o_fast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("rms_norm_fwd", x.device, backend or None)
    if fn is None:
        return _reference_fwd(x, weight, eps)
    n = x.shape[-1]
    out = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    fn(x.view(-1, n), weight, out.view(-1, n), rstd.view(-1), float(eps))
    return out, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("blip3o_fast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("rms_norm_bwd", x.device, backend or None)
    if fn is None:
        return _reference_bwd(dy, x, weight, rstd)
    n = x.shape[-1]
    dx = torch.empty_like(x)
    dweight = torch.empty(n, dtype=torch.float32, device=x.device)
    fn(dy.contiguous().view(-1, n), x.view(-1, n), weight, rstd.view(-1), dx.view(-1, n), dweight)
    return dx, dweight


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend):
    return torch.empty_like(x), x.new_empty(x.shape[-1:], dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_bwd(dy, x, weight, rstd, ctx.backend)
    return dx, dweight.to(weight.dtype), None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension. `backend`: torch | cpu | triton | cuda (default: by device)."""
    check_float("rms_norm", "x", x)
    check_same("rms_norm", "x", x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if dispatch.requested_backend(backend) == "torch":
        return rms_norm_reference(x, weight, eps)
    return _rms_norm_fwd(x.contiguous(), weight.contiguous(), float(eps), backend or "")[0]
