"""Shared helpers for the per-op tests: which faces run here, and the error metric and tolerances.

Metric: max |out - ref| / max |ref| (optionally with a floor under the denominator), against the
reference evaluated in fp32 on the same (already rounded) inputs.

Tolerances (DESIGN.md, "Correctness"):
  fp32        1e-5.
  fp16/bf16   2x the error PyTorch itself makes when it runs the same math natively in that dtype
              (the op's "naive" form, autograd included for gradients), with a floor of one unit
              of roundoff (torch.finfo(dtype).eps): on tiny shapes PyTorch's own error can be 0 by
              luck while a kernel still rounds its output once.
  bf16 under the Triton interpreter: at least 1e-2. The interpreter truncates fp32 -> bf16 instead
              of rounding to nearest (reference/environment.md), so one store can be a full bf16 ulp
              (2^-7 relative) off where a GPU would be half that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from blip3o_fast.ops import available_backends, dispatch

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def face_device(face: str) -> torch.device:
    """Where a face's tensors live in these tests: Triton runs on CPU tensors under the interpreter."""
    if face == "cpu" or (face == "triton" and dispatch.triton_interpreter()):
        return torch.device("cpu")
    return torch.device("cuda")


def faces_here() -> list[str]:
    """Built faces that can run on this machine (no cuda cases without a GPU)."""
    built = available_backends()
    found = [f for f in ("cpu",) if f in built]
    if "triton" in built and (dispatch.triton_interpreter() or torch.cuda.is_available()):
        found.append("triton")
    if "cuda" in built and torch.cuda.is_available():
        found.append("cuda")
    return found


def face_params(*kernels: str) -> list:
    """pytest params over faces_here(); a face missing one of `kernels` is a visible skip."""
    params = []
    for face in faces_here():
        why = ""
        for kernel in kernels:
            fn, why = dispatch._find(kernel, face)
            if fn is None:
                break
        marks = [pytest.mark.skip(reason=f"{face}: {why}")] if why else []
        params.append(pytest.param(face, marks=marks, id=face))
    return params


def kernel_fn(kernel: str, face: str):
    """The face's kernel function itself (contract signature), bypassing the custom op."""
    fn, why = dispatch._find(kernel, face)
    assert fn is not None, why
    return fn


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    denom = max(ref.float().abs().max().item(), floor)
    if denom == 0.0:
        return out.float().abs().max().item()
    return (out.float() - ref.float()).abs().max().item() / denom


def tolerance(face: str, dtype: torch.dtype, torch_err: float = 0.0) -> float:
    if dtype == torch.float32:
        return 1e-5
    tol = max(2.0 * torch_err, torch.finfo(dtype).eps)
    if dtype == torch.bfloat16 and face == "triton" and dispatch.triton_interpreter():
        tol = max(tol, 1e-2)
    return tol


def check_close(name: str, face: str, dtype: torch.dtype, out, ref, naive=None, floor: float = 0.0) -> None:
    """Assert out ~ ref (fp32 oracle) within the tolerance above; `naive` is PyTorch's own result in `dtype`."""
    torch_err = rel_err(naive, ref, floor) if naive is not None else 0.0
    err = rel_err(out, ref, floor)
    tol = tolerance(face, dtype, torch_err)
    assert err <= tol, f"{name} [{face}, {dtype}]: error {err:.3g} > tolerance {tol:.3g} (PyTorch's own {torch_err:.3g})"


def grads_of(out: torch.Tensor, dy: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, dy))


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def poison(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_scalar_child(code: str):
    """Run `code` in a subprocess with BLIP3O_FAST_CPU_SCALAR=1 (the C++ faces read it once per
    process, so the scalar paths need their own interpreter) and return the JSON its last line prints."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu face is not built")
    env = dict(os.environ, BLIP3O_FAST_CPU_SCALAR="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
