"""The DiT block epilogue, fused: gated residual of a sandwich-normed branch, then the next adaLN norm.

  x_out = x + gate[b] * RMSNorm(y) * y_weight
  h     = RMSNorm(x_out) * next_weight * (1 + next_scale[b])        (only when next_weight is given)

y is a branch output (attention after Wo, or the FFN), y_weight its sandwich norm (norm2 / ffn_norm2),
gate its tanh'ed adaLN gate; next_weight / next_scale are the adaLN RMSNorm-zero that reads the new
residual stream (ffn_norm1 with scale_mlp, or the next layer's norm1 with its scale_msa). One pass
over the row: all math in fp32, h is computed from the unrounded fp32 x_out, each output rounded
once to x's dtype. The rstd of y and of x_out are saved (fp32) for the backward, which recomputes
x_out in fp32 from x and y rather than reading the rounded one.

Faces: gated_residual_norm_reference (here), csrc/cpu/gated_residual_norm.cpp,
kernels/gated_residual_norm.py, csrc/cuda/gated_residual_norm.cu.
Kernel contract (all faces, every tensor contiguous; x, y, weights, gate, scale, dxo, dh, dx, dy one
dtype; rstd_* and the parameter gradients fp32; the *next* arguments are all None or all given):
  gated_residual_norm_fwd(x[B,T,N], y[B,T,N], y_weight[N], gate[B,N], next_weight[N]|None,
                          next_scale[B,N]|None, x_out[B,T,N], h[B,T,N]|None, rstd_y[B*T],
                          rstd_x[B*T]|None, eps)
  gated_residual_norm_bwd(dxo[B,T,N], dh[B,T,N]|None, x, y, y_weight, gate, next_weight|None,
                          next_scale|None, rstd_y, rstd_x|None, dx[B,T,N], dy[B,T,N], dy_weight[N],
                          dgate[B,N], dnext_weight[N]|None, dnext_scale[B,N]|None)
Backward per row, with yhat = y*rstd_y, xo = x_out in fp32, xohat = xo*rstd_x, s1 = 1 + next_scale:
  gh = dh*s1*next_weight;  gxo = dxo + rstd_x*(gh - xohat*mean(gh*xohat));  dx = gxo
  gy = gxo*gate*y_weight;  dy = rstd_y*(gy - yhat*mean(gy*yhat))
  dgate = sum_t gxo*yhat*y_weight, dy_weight = sum_bt gxo*gate*yhat,
  dnext_scale = sum_t dh*xohat*next_weight, dnext_weight = sum_bt dh*s1*xohat
Parameter sums run in an order fixed by the shape (deterministic).
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same


def gated_residual_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    y_weight: torch.Tensor,
    gate: torch.Tensor,
    next_weight: torch.Tensor | None = None,
    next_scale: torch.Tensor | None = None,
    eps: float = 1e-5,
):
    xo = x.float() + gate.float()[:, None, :] * _rms(y.float(), eps) * y_weight.float()
    if next_weight is None:
        return xo.to(x.dtype)
    h = _rms(xo, eps) * next_weight.float() * (1 + next_scale.float()[:, None, :])
    return xo.to(x.dtype), h.to(x.dtype)


def _rms(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def _reference_fwd(x, y, y_weight, gate, next_weight, next_scale, eps):
    yf = y.float()
    rstd_y = torch.rsqrt(yf.pow(2).mean(-1) + eps)
    xo = x.float() + gate.float()[:, None, :] * (yf * rstd_y[..., None]) * y_weight.float()
    if next_weight is None:
        return xo.to(x.dtype), x.new_empty(0), rstd_y.reshape(-1), x.new_empty(0, dtype=torch.float32)
    rstd_x = torch.rsqrt(xo.pow(2).mean(-1) + eps)
    h = xo * rstd_x[..., None] * next_weight.float() * (1 + next_scale.float()[:, None, :])
    return xo.to(x.dtype), h.to(x.dtype), rstd_y.reshape(-1), rstd_x.reshape(-1)


def _reference_bwd(dxo, dh, x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x):
    b, t, n = x.shape
    ry = rstd_y.view(b, t, 1)
    yhat = y.float() * ry
    wy = y_weight.float()
    g = gate.float()[:, None, :]
    gxo = dxo.float()
    dnw, dns = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    if next_weight is not None:
        rx = rstd_x.view(b, t, 1)
        xohat = (x.float() + g * yhat * wy) * rx
        wn = next_weight.float()
        dhf = dh.float()
        s1 = 1 + next_scale.float()[:, None, :]
        dns = (dhf * xohat * wn).sum(1)
        dnw = (dhf * s1 * xohat).sum((0, 1))
        gh = dhf * s1 * wn
        gxo = gxo + rx * (gh - xohat * (gh * xohat).mean(-1, keepdim=True))
    dgate = (gxo * yhat * wy).sum(1)
    dyw = (gxo * g * yhat).sum((0, 1))
    gy = gxo * g * wy
    dy = ry * (gy - yhat * (gy * yhat).mean(-1, keepdim=True))
    # copy=True: without a next norm gxo may be dxo itself, and an output must not alias an input.
    return gxo.to(x.dtype, copy=True), dy.to(x.dtype), dyw, dgate, dnw, dns


@torch.library.custom_op("blip3o_fast::gated_residual_norm_fwd", mutates_args=())
def _fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    y_weight: torch.Tensor,
    gate: torch.Tensor,
    next_weight: torch.Tensor | None,
    next_scale: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("gated_residual_norm_fwd", x.device, backend or None)
    if fn is None:
        return _reference_fwd(x, y, y_weight, gate, next_weight, next_scale, eps)
    rows = x.shape[0] * x.shape[1]
    x_out = torch.empty_like(x)
    rstd_y = torch.empty(rows, dtype=torch.float32, device=x.device)
    if next_weight is None:
        h, rstd_x = x.new_empty(0), x.new_empty(0, dtype=torch.float32)
        fn(x, y, y_weight, gate, None, None, x_out, None, rstd_y, None, float(eps))
    else:
        h, rstd_x = torch.empty_like(x), torch.empty(rows, dtype=torch.float32, device=x.device)
        fn(x, y, y_weight, gate, next_weight, next_scale, x_out, h, rstd_y, rstd_x, float(eps))
    return x_out, h, rstd_y, rstd_x


@_fwd.register_fake
def _(x, y, y_weight, gate, next_weight, next_scale, eps, backend):
    rows = x.shape[0] * x.shape[1]
    f32 = torch.float32
    if next_weight is None:
        return torch.empty_like(x), x.new_empty(0), x.new_empty((rows,), dtype=f32), x.new_empty(0, dtype=f32)
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((rows,), dtype=f32), x.new_empty((rows,), dtype=f32)


@torch.library.custom_op("blip3o_fast::gated_residual_norm_bwd", mutates_args=())
def _bwd(
    dxo: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    y_weight: torch.Tensor,
    gate: torch.Tensor,
    next_weight: torch.Tensor | None,
    next_scale: torch.Tensor | None,
    rstd_y: torch.Tensor,
    rstd_x: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("gated_residual_norm_bwd", x.device, backend or None)
    if fn is None:
        return _reference_bwd(dxo, dh, x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x)
    f32 = torch.float32
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    dyw = torch.empty(x.shape[-1], dtype=f32, device=x.device)
    dgate = torch.empty(gate.shape, dtype=f32, device=x.device)
    if next_weight is None:
        dnw, dns = x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
        fn(dxo.contiguous(), None, x, y, y_weight, gate, None, None, rstd_y, None, dx, dy, dyw, dgate, None, None)
    else:
        dnw, dns = torch.empty_like(dyw), torch.empty_like(dgate)
        fn(dxo.contiguous(), dh.contiguous(), x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x,
           dx, dy, dyw, dgate, dnw, dns)
    return dx, dy, dyw, dgate, dnw, dns


@_bwd.register_fake
def _(dxo, dh, x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x, backend):
    f32 = torch.float32
    pw, pg = x.new_empty(x.shape[-1:], dtype=f32), x.new_empty(gate.shape, dtype=f32)
    if next_weight is None:
        return torch.empty_like(x), torch.empty_like(y), pw, pg, x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
    return torch.empty_like(x), torch.empty_like(y), pw, pg, torch.empty_like(pw), torch.empty_like(pg)


def _setup(ctx, inputs, output):
    x, y, y_weight, gate, next_weight, next_scale, _, backend = inputs
    ctx.has_next = next_weight is not None
    ctx.save_for_backward(x, y, y_weight, gate, next_weight, next_scale, output[2], output[3])
    ctx.backend = backend


def _backward(ctx, dxo, dh, _drstd_y, _drstd_x):
    x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x = ctx.saved_tensors
    if not ctx.has_next:
        next_weight = next_scale = rstd_x = dh = None
    dx, dy, dyw, dgate, dnw, dns = _bwd(dxo, dh, x, y, y_weight, gate, next_weight, next_scale, rstd_y, rstd_x,
                                        ctx.backend)
    if not ctx.has_next:
        return dx, dy, dyw.to(y_weight.dtype), dgate.to(gate.dtype), None, None, None, None
    return dx, dy, dyw.to(y_weight.dtype), dgate.to(gate.dtype), dnw.to(next_weight.dtype), \
        dns.to(next_scale.dtype), None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def gated_residual_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    y_weight: torch.Tensor,
    gate: torch.Tensor,
    next_weight: torch.Tensor | None = None,
    next_scale: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
):
    """x + gate * RMSNorm(y) * y_weight -> x_out, and with next_weight/next_scale also
    h = RMSNorm(x_out) * next_weight * (1 + next_scale) -> (x_out, h). x, y (B, T, N); y_weight,
    next_weight (N); gate, next_scale (B, N); one dtype and device for all."""
    op = "gated_residual_norm"
    check_float(op, "x", x)
    check_same(op, "x", x, y=y, y_weight=y_weight, gate=gate)
    if (next_weight is None) != (next_scale is None):
        raise ValueError(f"{op}: next_weight and next_scale go together (give both or neither)")
    if next_weight is not None:
        check_same(op, "x", x, next_weight=next_weight, next_scale=next_scale)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, T, N), got {tuple(x.shape)}")
    b, _, n = x.shape
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    for name, t, want in (("y_weight", y_weight, (n,)), ("gate", gate, (b, n)), ("next_weight", next_weight, (n,)),
                          ("next_scale", next_scale, (b, n))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must be {want}, got {tuple(t.shape)}")
    if dispatch.requested_backend(backend) == "torch":
        return gated_residual_norm_reference(x, y, y_weight, gate, next_weight, next_scale, eps)
    nw = None if next_weight is None else next_weight.contiguous()
    ns = None if next_scale is None else next_scale.contiguous()
    x_out, h, _, _ = _fwd(x.contiguous(), y.contiguous(), y_weight.contiguous(), gate.contiguous(), nw, ns,
                          float(eps), backend or "")
    return x_out if next_weight is None else (x_out, h)
