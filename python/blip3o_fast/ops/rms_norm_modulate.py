"""adaLN RMSNorm-zero modulation (Lumina-Next's LuminaRMSNormZero after its linear):
y = RMSNorm(x) * weight * (1 + scale[b]), computed in fp32, rounded once to x's dtype.

Faces: rms_norm_modulate_reference (here), csrc/cpu/rms_norm_modulate.cpp,
kernels/rms_norm_modulate.py, csrc/cuda/rms_norm_modulate.cu.
Kernel contract (all faces, every tensor contiguous, x/weight/scale one dtype):
  rms_norm_modulate_fwd(x[B,T,N], weight[N], scale[B,N], out[B,T,N], rstd[B*T] fp32, eps)
  rms_norm_modulate_bwd(dy[B,T,N], x, weight, scale, rstd, dx[B,T,N], dweight[N] fp32, dscale[B,N] fp32)
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same


def rms_norm_modulate_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float() * (1 + scale.float()[:, None, :])).to(x.dtype)


def _reference_fwd(x, weight, scale, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    out = xf * rstd[..., None] * weight.float() * (1 + scale.float()[:, None, :])
    return out.to(x.dtype), rstd.reshape(-1)


def _reference_bwd(dy, x, weight, scale, rstd):
    r = rstd.view(x.shape[0], x.shape[1], 1)
    xhat = x.float() * r
    normed = xhat * weight.float()
    dyf = dy.float()
    dscale = (dyf * normed).sum(1)
    dn = dyf * (1 + scale.float()[:, None, :])
    dweight = (dn * xhat).sum((0, 1))
    g = dn * weight.float()
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight, dscale


@torch.library.custom_op("blip3o_fast::rms_norm_modulate_fwd", mutates_args=())
def _fwd(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("rms_norm_modulate_fwd", x.device, backend or None)
    if fn is None:
        return _reference_fwd(x, weight, scale, eps)
    out = torch.empty_like(x)
    rstd = torch.empty(x.shape[0] * x.shape[1], dtype=torch.float32, device=x.device)
    fn(x, weight, scale, out, rstd, float(eps))
    return out, rstd


@_fwd.register_fake
def _(x, weight, scale, eps, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0] * x.shape[1],), dtype=torch.float32)


@torch.library.custom_op("blip3o_fast::rms_norm_modulate_bwd", mutates_args=())
def _bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("rms_norm_modulate_bwd", x.device, backend or None)
    if fn is None:
        return _reference_bwd(dy, x, weight, scale, rstd)
    dx = torch.empty_like(x)
    dweight = torch.empty(x.shape[-1], dtype=torch.float32, device=x.device)
    dscale = torch.empty(scale.shape, dtype=torch.float32, device=x.device)
    fn(dy.contiguous(), x, weight, scale, rstd, dx, dweight, dscale)
    return dx, dweight, dscale


@_bwd.register_fake
def _(dy, x, weight, scale, rstd, backend):
    f32 = torch.float32
    return torch.empty_like(x), x.new_empty(x.shape[-1:], dtype=f32), x.new_empty(scale.shape, dtype=f32)


def _setup(ctx, inputs, output):
    x, weight, scale, _, backend = inputs
    ctx.save_for_backward(x, weight, scale, output[1])
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    dx, dweight, dscale = _bwd(dy, x, weight, scale, rstd, ctx.backend)
    return dx, dweight.to(weight.dtype), dscale.to(scale.dtype), None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm(x) * weight * (1 + scale) with x (B, T, N), weight (N), scale (B, N)."""
    check_float("rms_norm_modulate", "x", x)
    check_same("rms_norm_modulate", "x", x, weight=weight, scale=scale)
    if x.dim() != 3:
        raise ValueError(f"rms_norm_modulate: x must be (B, T, N), got {tuple(x.shape)}")
    b, _, n = x.shape
    if tuple(weight.shape) != (n,) or tuple(scale.shape) != (b, n):
        raise ValueError(
            f"rms_norm_modulate: weight must be ({n},) and scale ({b}, {n}); "
            f"got {tuple(weight.shape)} and {tuple(scale.shape)}"
        )
    if dispatch.requested_backend(backend) == "torch":
        return rms_norm_modulate_reference(x, weight, scale, eps)
    return _fwd(x.contiguous(), weight.contiguous(), scale.contiguous(), float(eps), backend or "")[0]
