"""SwiGLU: y = silu(gate) * up, computed in fp32, rounded once to the input dtype.

Faces: swiglu_reference (here), csrc/cpu/swiglu.cpp, kernels/swiglu.py, csrc/cuda/swiglu.cu.
Kernel contract (all faces, n = numel, every tensor contiguous, one dtype):
  swiglu_fwd(gate[n], up[n], out[n])
  swiglu_bwd(dy[n], gate[n], up[n], dgate[n], dup[n])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _reference_bwd(dy, gate, up):
    g = gate.float()
    sig = torch.sigmoid(g)
    dyf = dy.float()
    dgate = dyf * up.float() * sig * (1 + g * (1 - sig))
    dup = dyf * g * sig
    return dgate.to(gate.dtype), dup.to(up.dtype)


@torch.library.custom_op("blip3o_fast::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    _, fn = dispatch.kernel_for("swiglu_fwd", gate.device, backend or None)
    if fn is None:
        return swiglu_reference(gate, up)
    out = torch.empty_like(gate)
    fn(gate.view(-1), up.view(-1), out.view(-1))
    return out


@_swiglu_fwd.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate)


@torch.library.custom_op("blip3o_fast::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("swiglu_bwd", gate.device, backend or None)
    if fn is None:
        return _reference_bwd(dy, gate, up)
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    fn(dy.contiguous().view(-1), gate.view(-1), up.view(-1), dgate.view(-1), dup.view(-1))
    return dgate, dup


@_swiglu_bwd.register_fake
def _(dy, gate, up, backend):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_bwd(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up share shape, dtype and device."""
    check_float("swiglu", "gate", gate)
    check_same("swiglu", "gate", gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if dispatch.requested_backend(backend) == "torch":
        return swiglu_reference(gate, up)
    return dispatch.call(_swiglu_fwd, gate.contiguous(), up.contiguous(), backend or "", grad_inputs=(gate, up))
