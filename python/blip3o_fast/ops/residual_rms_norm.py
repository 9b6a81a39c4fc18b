"""The decoder layer's residual add + RMSNorm, fused:

  new_residual = x + residual           rounded to x's dtype, as the unfused `residual + hidden` does
  y            = rms_norm(new_residual, weight, eps)

y follows the rms_norm op's convention exactly: it is computed in fp32 from the ROUNDED new_residual
and rounded once (so y equals ops.rms_norm(new_residual, weight) up to the faces' sum order). With
residual None (the first layer) new_residual is x itself and y is ops.rms_norm(x).

Backward, with s = new_residual (fp32), xhat = s * rstd, g = dy * weight:
  ds = dres + rstd * (g - xhat * mean(g * xhat))     one rounding;  dx = dresidual = ds
  dweight = sum over rows of dy * xhat               (fp32 partials in a shape-fixed order: deterministic)

Faces: residual_rms_norm_reference (here), csrc/cpu/residual_rms_norm.cpp, kernels/residual_rms_norm.py,
csrc/cuda/residual_rms_norm.cu; the row math is csrc/include/blip3o/rms_norm.h.
Kernel contract (all faces, rows = x.numel() // N, every tensor contiguous, one dtype but rstd/dweight fp32):
  residual_rms_norm_fwd(x[rows,N], residual[rows,N], weight[N], out[rows,N], new_residual[rows,N], rstd[rows], eps)
  residual_rms_norm_bwd(dy[rows,N], dres[rows,N], s[rows,N], weight[N], rstd[rows], ds[rows,N], dweight[N])
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same
from blip3o_fast.ops.rms_norm import rms_norm, rms_norm_reference


def residual_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(s, weight, eps), s


def _reference_fwd(x, residual, weight, eps):
    s = (x.float() + residual.float()).to(x.dtype)
    sf = s.float()
    rstd = torch.rsqrt(sf.pow(2).mean(-1) + eps)
    return (sf * rstd[..., None] * weight.float()).to(x.dtype), s, rstd


def _reference_bwd(dy, dres, s, weight, rstd):
    xhat = s.float() * rstd[..., None]
    g = dy.float() * weight.float()
    ds = dres.float() + rstd[..., None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (dy.float() * xhat).reshape(-1, s.shape[-1]).sum(0)
    return ds.to(s.dtype), dweight


@torch.library.custom_op("blip3o_fast::residual_rms_norm_fwd", mutates_args=())
def _fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("residual_rms_norm_fwd", x.device, backend or None)
    if fn is None:
        return _reference_fwd(x, residual, weight, eps)
    n = x.shape[-1]
    out, s = torch.empty_like(x), torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    fn(x.view(-1, n), residual.view(-1, n), weight, out.view(-1, n), s.view(-1, n), rstd.view(-1), float(eps))
    return out, s, rstd


@_fwd.register_fake
def _(x, residual, weight, eps, backend):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("blip3o_fast::residual_rms_norm_bwd", mutates_args=())
def _bwd(
    dy: torch.Tensor, dres: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("residual_rms_norm_bwd", s.device, backend or None)
    if fn is None:
        return _reference_bwd(dy, dres, s, weight, rstd)
    n = s.shape[-1]
    ds = torch.empty_like(s)
    dweight = torch.empty(n, dtype=torch.float32, device=s.device)
    fn(dy.contiguous().view(-1, n), dres.contiguous().view(-1, n), s.view(-1, n), weight, rstd.view(-1),
       ds.view(-1, n), dweight)
    return ds, dweight


@_bwd.register_fake
def _(dy, dres, s, weight, rstd, backend):
    return torch.empty_like(s), s.new_empty(s.shape[-1:], dtype=torch.float32)


def _setup(ctx, inputs, output):
    _, _, weight, _, backend = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.backend = backend


def _backward(ctx, dy, dres, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds, dweight = _bwd(dy, dres, s, weight, rstd, ctx.backend)
    # d(x + residual)/dx = d/dresidual = identity: both get the same gradient, as autograd's add gives.
    return ds, ds, dweight.to(weight.dtype), None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def residual_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6, *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) over the last dimension; residual None means
    the first layer (x is then the new residual). `backend`: torch | cpu | triton | cuda (default: by device)."""
    op = "residual_rms_norm"
    check_float(op, "x", x)
    check_same(op, "x", x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is None:
        return rms_norm(x, weight, eps, backend=backend), x
    check_same(op, "x", x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if dispatch.requested_backend(backend) == "torch":
        return residual_rms_norm_reference(x, residual, weight, eps)
    y, s, _ = dispatch.call(_fwd, x.contiguous(), residual.contiguous(), weight.contiguous(), float(eps),
                            backend or "", grad_inputs=(x, residual, weight))
    return y, s
