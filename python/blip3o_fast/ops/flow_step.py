"""The flow-matching sampler update with the CFG combine inside it, in place (inference only).

One kernel covers the solvers the engine runs. With x (B, ...) and the DiT's velocity v, either
(2B, ...) as the doubled CFG batch (rows 0..B-1 unconditional, B..2B-1 conditional, spec 5.1) or
(B, ...) with no guidance:
  vc  = v_u + guidance * (v_c - v_u)        (vc = v when v has B rows; guidance is then unused)
  out = x + dt * vc + c_prev * v_prev       (the v_prev term only when v_prev is given)
  v_save = vc                               (only when v_save is given)
All of it in fp32, out rounded once to x's dtype; out may be x itself (in place), v_save may be
v_prev itself (each element is read before it is written). The solvers, with no temporaries
beyond one fp32 velocity buffer vb (B, ...):
  Euler            flow_step(x, v, dt, g)                                  x += dt vc
  Heun predictor   flow_step(x, v1, dt, g, out=x_pred, v_save=vb)         x_pred = x + dt v1, vb = v1
  Heun corrector   flow_step(x, v2, dt/2, g, v_prev=vb, c_prev=dt/2)      x += dt/2 (v2 + v1)
  2-step multistep flow_step(x, v, dt*c1, g, v_prev=vb, c_prev=dt*c2, v_save=vb)
                                                                          x += dt (c1 v_n + c2 v_n-1)
exact=True reproduces the released sampler bit for bit (engine/flow_sampler.py, reference_exact):
the combine in v's dtype with a rounding after each operation (v_c - v_u, guidance * that, v_u +
that; PyTorch keeps the Python-float guidance itself in fp32), then diffusers'
FlowMatchEulerDiscreteScheduler step: dt * vc in v's dtype, added to x upcast to fp32, the sum
rounded back to v's dtype. dt is a float32 0-dim CPU tensor there: PyTorch's CPU kernels round it
to v's dtype before the product, its CUDA kernels keep it in fp32, so the exact bits follow the
device (the reference below is that same expression). dt must then be the float32 value
sigma_next - sigma; x and v share a dtype; no v_prev / v_save.

Faces: flow_step_reference (here), csrc/cpu/flow_step.cpp, kernels/flow_step.py, csrc/cuda/flow_step.cu.
Kernel contract (all faces, every tensor contiguous, viewed as rows; out shares x's dtype, v may
differ; v_prev / v_save fp32):
  flow_step(x[B,N], v[R,N] with R in (B, 2B), out[B,N], v_prev[B,N]|None, v_save[B,N]|None,
            dt, guidance, c_prev, exact)
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float


def flow_step_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: float,
    guidance: float = 1.0,
    v_prev: torch.Tensor | None = None,
    c_prev: float = 0.0,
    exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new x in x's dtype, combined velocity: fp32, or v's dtype when exact); inputs untouched."""
    guided = v.shape[0] == 2 * x.shape[0] and x.shape[0] > 0
    if exact:
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        return (x.float() + torch.tensor(dt, dtype=torch.float32) * v).to(v.dtype), v
    vc = v.float()
    if guided:
        v_u, v_c = vc.chunk(2)
        vc = v_u + guidance * (v_c - v_u)
    xn = x.float() + dt * vc
    if v_prev is not None:
        xn = xn + c_prev * v_prev.float()
    return xn.to(x.dtype), vc


@torch.library.custom_op("blip3o_fast::flow_step", mutates_args=("out", "v_save"))
def _flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    v_prev: torch.Tensor | None,
    v_save: torch.Tensor | None,
    dt: float,
    guidance: float,
    c_prev: float,
    exact: bool,
    backend: str,
) -> None:
    _, fn = dispatch.kernel_for("flow_step", x.device, backend or None)
    if fn is None:
        xn, vc = flow_step_reference(x, v, dt, guidance, v_prev, c_prev, exact)
        out.copy_(xn)
        if v_save is not None:
            v_save.copy_(vc)
        return
    if x.numel() == 0:
        return

    def rows(t):
        return None if t is None else t.view(t.shape[0], -1)

    fn(rows(x), rows(v), rows(out), rows(v_prev), rows(v_save), float(dt), float(guidance), float(c_prev),
       bool(exact))


@_flow_step.register_fake
def _(x, v, out, v_prev, v_save, dt, guidance, c_prev, exact, backend):
    return None


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: float,
    guidance: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    v_prev: torch.Tensor | None = None,
    c_prev: float = 0.0,
    v_save: torch.Tensor | None = None,
    exact: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """out = x + dt * (v_u + guidance (v_c - v_u)) [+ c_prev * v_prev], written into out (default:
    x itself, in place) and returned; v_save receives the combined velocity. See the module
    docstring for the solvers built from it and for exact=True."""
    op = "flow_step"
    check_float(op, "x", x)
    check_float(op, "v", v)
    if v.device != x.device:
        raise ValueError(f"{op}: v is on {v.device} but x is on {x.device}")
    dispatch.requested_backend(backend)  # a bad name fails here, not inside the custom op
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a batch dimension, got a 0-dim tensor")
    b = x.shape[0]
    if v.dim() != x.dim() or v.shape[1:] != x.shape[1:] or v.shape[0] not in (b, 2 * b):
        raise ValueError(
            f"{op}: v must be ({b}, ...) or ({2 * b}, ...) (unconditional rows first) with x's trailing shape "
            f"{tuple(x.shape[1:])}, got {tuple(v.shape)}"
        )
    out = x if out is None else out
    check_float(op, "out", out)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{op}: out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out (x itself when out is not given) must be contiguous: it is written in place")
    for name, t in (("v_prev", v_prev), ("v_save", v_save)):
        if t is None:
            continue
        if exact:
            raise ValueError(f"{op}: exact=True is the reference's Euler step; it takes no {name}")
        if t.dtype != torch.float32 or t.shape != x.shape or t.device != x.device:
            raise ValueError(f"{op}: {name} must be float32 with x's shape {tuple(x.shape)} on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if v_save is not None and not v_save.is_contiguous():
        raise ValueError(f"{op}: v_save must be contiguous: it is written in place")
    if exact and v.dtype != x.dtype:
        raise TypeError(f"{op}: exact=True keeps x in the model's dtype: x is {x.dtype} but v is {v.dtype}")
    _flow_step(x.contiguous(), v.contiguous(), out, None if v_prev is None else v_prev.contiguous(), v_save,
               float(dt), float(guidance), float(c_prev), bool(exact), backend or "")
    return out
