"""Fused lm_head + cross-entropy for the understanding (text) loss over a 151k vocabulary.

  logits = hidden @ weight^T                     (N, V), accumulated in fp32, never materialised
  loss_i = logsumexp_j(logits_ij) - logits_i,t_i   for rows whose target t_i != ignore_index, else 0

The kernels tile over rows and vocab with an online log-sum-exp, so memory is O(N + tile) instead of
the (N, V) fp32 logits (2.5 GB for 4k tokens at V = 151936). The forward saves only the per-row LSE
(fp32); the backward recomputes each logit tile:
  dlogits = (exp(logits - lse) - onehot(t)) * dloss_row;  dhidden = dlogits @ W;  dweight = dlogits^T @ hidden
dweight is skipped when the weight needs no gradient (a frozen lm_head). The reduction (mean over
non-ignored rows, sum, none) is plain torch on the per-row losses, so autograd hands the kernels the
per-row gradient dloss (N,) fp32 (0 on ignored rows, which the kernels also skip).

Faces: linear_cross_entropy_reference (here), csrc/cpu/linear_cross_entropy.cpp,
kernels/linear_cross_entropy.py, csrc/cuda/linear_cross_entropy.cu.
Kernel contract (all faces; every tensor contiguous; hidden, weight, dhidden, dweight one dtype;
targets int64 and already validated: each is ignore_index or in [0, V)):
  linear_cross_entropy_fwd(hidden[N,H], weight[V,H], targets[N], loss[N] fp32, lse[N] fp32, ignore_index)
      loss = 0 and lse = 0 on ignored rows.
  linear_cross_entropy_bwd(dloss[N] fp32, hidden, weight, targets, lse[N] fp32, dhidden[N,H]|None,
                           dweight[V,H]|None, ignore_index)
      dhidden by row tiles, dweight by vocab tiles (each tile sums over all rows itself: no atomics,
      deterministic); fp32 accumulation, each output rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float, check_same

REDUCTIONS = ("mean", "sum", "none")


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """rows (N,) fp32 with 0 on ignored rows -> the reduced loss; mean over valid rows, 0 when none."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / valid.sum().clamp(min=1)
    return rows


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The oracle: materialises the fp32 logits and calls F.cross_entropy. Differentiable by autograd."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    logits = h.float() @ weight.float().T
    rows = torch.nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    loss = _reduce(rows, t != ignore_index, reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def _reference_fwd(hidden, weight, targets, ignore_index):
    logits = hidden.float() @ weight.float().T
    valid = targets != ignore_index
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    zero = torch.zeros_like(lse)
    return torch.where(valid, lse - picked, zero), torch.where(valid, lse, zero)


def _reference_bwd(dloss, hidden, weight, targets, lse, ignore_index, need_dhidden, need_dweight):
    """The torch face of the backward, written out (autograd does not record inside a custom op)."""
    valid = targets != ignore_index
    logits = hidden.float() @ weight.float().T
    dlogits = torch.exp(logits - lse[:, None])
    dlogits[torch.arange(len(targets), device=targets.device)[valid], targets[valid]] -= 1.0
    dlogits *= torch.where(valid, dloss, 0.0)[:, None]
    dh = (dlogits @ weight.float()).to(hidden.dtype) if need_dhidden else hidden.new_empty(0)
    dw = (dlogits.T @ hidden.float()).to(weight.dtype) if need_dweight else weight.new_empty(0)
    return dh, dw


@torch.library.custom_op("blip3o_fast::linear_cross_entropy_fwd", mutates_args=())
def _fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("linear_cross_entropy_fwd", hidden.device, backend or None)
    if fn is None:
        return _reference_fwd(hidden, weight, targets, ignore_index)
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    fn(hidden, weight, targets, loss, lse, int(ignore_index))
    return loss, lse


@_fwd.register_fake
def _(hidden, weight, targets, ignore_index, backend):
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("blip3o_fast::linear_cross_entropy_bwd", mutates_args=())
def _bwd(
    dloss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    need_dhidden: bool,
    need_dweight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = dispatch.kernel_for("linear_cross_entropy_bwd", hidden.device, backend or None)
    if fn is None:
        return _reference_bwd(dloss, hidden, weight, targets, lse, ignore_index, need_dhidden, need_dweight)
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    fn(dloss, hidden, weight, targets, lse, dh if need_dhidden else None, dw if need_dweight else None,
       int(ignore_index))
    return dh, dw


@_bwd.register_fake
def _(dloss, hidden, weight, targets, lse, ignore_index, need_dhidden, need_dweight, backend):
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    return dh, dw


def _setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.flags = (ignore_index, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, _dlse):
    hidden, weight, targets, lse = ctx.saved_tensors
    ignore_index, backend = ctx.flags
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dh or need_dw):
        return None, None, None, None, None
    dh, dw = _bwd(dloss.float().contiguous(), hidden, weight, targets, lse, ignore_index, need_dh, need_dw, backend)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of hidden @ weight^T against targets without materialising the logits.

    hidden (..., H) and weight (V, H) one float dtype and device; targets (...) integer, matching hidden's
    leading dims; rows whose target is ignore_index contribute 0. reduction "mean" (over non-ignored
    rows; 0 when every row is ignored), "sum", or "none" (fp32 loss in targets' shape)."""
    op = "linear_cross_entropy"
    check_float(op, "hidden", hidden)
    check_same(op, "hidden", hidden, weight=weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be an int64 (or int32) tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.device != hidden.device:
        raise ValueError(f"{op}: targets is on {targets.device} but hidden is on {hidden.device}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary (V = 0): the log-sum-exp needs a class")
    t = targets.reshape(-1).long()
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    # The kernels never read outside the weight (an id out of range matches no column), but the loss would
    # be silently wrong: refuse it. That costs one host sync, which a CUDA graph capture cannot take, so
    # there the check is a device-side assert instead.
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        torch._assert_async(~bad.any(), f"{op}: a target is out of range for vocabulary size {vocab}")
    elif bool(bad.any()):
        raise ValueError(f"{op}: target {int(t[bad][0])} is out of range for vocabulary size {vocab} "
                         f"(and is not ignore_index={ignore_index})")
    if dispatch.requested_backend(backend) == "torch":
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rows, _ = _fwd(h, weight.contiguous(), t.contiguous(), int(ignore_index), backend or "")
    loss = _reduce(rows, t != ignore_index, reduction)
    return loss.view(targets.shape) if reduction == "none" else loss
