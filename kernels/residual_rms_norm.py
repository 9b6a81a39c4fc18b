"""Residual add + RMSNorm Triton launchers: the Triton face of blip3o_fast.ops.residual_rms_norm (contract in
its docstring). The kernels are kernels/rms_norm.py's with HAS_RESIDUAL set: the forward rounds x + residual
to the storage dtype, stores it, and normalises the rounded row; the backward adds dres to the norm's dx
before its one rounding and keeps per-program fp32 dweight partials, summed in a fixed order
(deterministic, no float atomics)."""

from __future__ import annotations

import torch

from blip3o_fast.kernels.rms_norm import norm_bwd, norm_fwd


def residual_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, new_residual: torch.Tensor,
    rstd: torch.Tensor, eps: float,
) -> None:
    norm_fwd(x, residual, weight, out, new_residual, rstd, eps)


def residual_rms_norm_bwd(
    dy: torch.Tensor, dres: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, ds: torch.Tensor,
    dweight: torch.Tensor,
) -> None:
    norm_bwd(dy, dres, s, weight, rstd, ds, dweight)
