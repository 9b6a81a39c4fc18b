"""Explicit dispatch from an op's kernel name to one of its faces.

Faces (backends), in the order a newcomer should read them:
  torch   the PyTorch reference in python/blip3o_fast/ops/<op>.py (always there; the fallback)
  cpu     C++ kernels in csrc/cpu/, module blip3o_fast._C (CPU tensors)
  triton  Triton kernels in kernels/ (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cuda    CUDA kernels in csrc/cuda/, same module, names ending in _cuda (CUDA tensors)

Choice, first match wins: the call's `backend=` argument, then BLIP3O_FAST_BACKEND, then the
device default (CPU tensors -> cpu; CUDA tensors -> the kernel's entry in CUDA_DEFAULTS, else triton).
A face that is not built, or cannot run on the tensor's device, falls back to the reference with
a one-time warning naming the op, the face and the reason.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "BLIP3O_FAST_BACKEND"

# CUDA tensors' default face where Triton's is not the fastest, from benchmarks/ops on an H100 (README,
# "On a GPU"); every other kernel defaults to Triton there.
CUDA_DEFAULTS: dict[str, str] = {
    "sample_tokens": "cuda",   # top-k / top-p rows 1.3-1.6x faster than Triton's, greedy level
    "decode_linear": "torch",  # cuBLAS streamed the weights at 71-76% of memcpy, our faces at 19-66%
}

# Kernel name -> Triton module under blip3o_fast.kernels (one file per op family).
TRITON_MODULES = {
    "rms_norm_fwd": "rms_norm",
    "rms_norm_bwd": "rms_norm",
    "dit_attention_fwd": "dit_attention",
    "dit_attention_bwd": "dit_attention",
    "rope_apply": "rope",
    "swiglu_fwd": "swiglu",
    "swiglu_bwd": "swiglu",
    "rms_norm_modulate_fwd": "rms_norm_modulate",
    "rms_norm_modulate_bwd": "rms_norm_modulate",
    "gated_residual_norm_fwd": "gated_residual_norm",
    "gated_residual_norm_bwd": "gated_residual_norm",
    "flow_step": "flow_step",
    "varlen_prefill_attention_fwd": "varlen_prefill_attention",
    "rope_kv_cache_write": "rope_kv_cache_write",
    "paged_decode_attention": "paged_decode_attention",
    "linear_cross_entropy_fwd": "linear_cross_entropy",
    "linear_cross_entropy_bwd": "linear_cross_entropy",
    "residual_rms_norm_fwd": "residual_rms_norm",
    "residual_rms_norm_bwd": "residual_rms_norm",
    "sample_tokens": "sample_tokens",
    "decode_linear": "decode_linear",
}


@functools.cache
def _compiled_module():
    try:
        return importlib.import_module("blip3o_fast._C")
    except ImportError as exc:  # a source checkout without a build
        warnings.warn(f"blip3o_fast: compiled module not importable ({exc}); C++/CUDA faces disabled")
        return None


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The faces built into this install (whether a device can run them is decided per call)."""
    found = ["torch"]
    c = _compiled_module()
    if c is not None:
        found.append("cpu")
    if _triton_importable():
        found.append("triton")
    if c is not None and c.has_cuda():
        found.append("cuda")
    return found


def _cuda_stream_arg(fn: Callable) -> Callable:
    def call(*args):
        return fn(*args, torch.cuda.current_stream().cuda_stream)

    return call


def _find(kernel: str, backend: str) -> tuple[Callable | None, str]:
    """The kernel function of one face, or None and why not."""
    if backend == "cpu" or backend == "cuda":
        c = _compiled_module()
        if c is None:
            return None, "blip3o_fast._C is not built"
        if backend == "cuda" and not c.has_cuda():
            return None, "built without a CUDA toolkit"
        name = kernel if backend == "cpu" else kernel + "_cuda"
        fn = getattr(c, name, None)
        if fn is None:
            return None, f"_C has no {name}"
        return (fn if backend == "cpu" else _cuda_stream_arg(fn)), ""
    if backend == "triton":
        if not _triton_importable():
            return None, "triton is not installed"
        module = TRITON_MODULES.get(kernel)
        if module is None:
            return None, "no Triton kernel"
        fn = getattr(importlib.import_module(f"blip3o_fast.kernels.{module}"), kernel, None)
        if fn is None:
            return None, f"kernels/{module}.py has no {kernel}"
        return fn, ""
    return None, f"unknown backend {backend!r}"


def _device_ok(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "cpu":
        return device.type == "cpu", "the cpu face runs on CPU tensors only"
    if backend == "cuda":
        return device.type == "cuda", "the cuda face runs on CUDA tensors only"
    if backend == "triton":
        if device.type == "cuda":
            return True, ""
        return device.type == "cpu" and triton_interpreter(), "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return True, ""


def requested_backend(backend: str | None) -> str | None:
    chosen = backend or os.environ.get(ENV_VAR) or None
    if chosen is not None and chosen not in BACKENDS:
        raise ValueError(f"blip3o_fast: backend must be one of {BACKENDS}, got {chosen!r}")
    return chosen


def default_backend(kernel: str, device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return CUDA_DEFAULTS.get(kernel, "triton")
    return "torch"


_warned: set[tuple[str, str, str]] = set()


def call(op, *args, grad_inputs: tuple = ()):
    """Run a torch.library custom op. In plain eager inference (not compiling, no input in grad_inputs
    requiring grad) its Python implementation is called directly: the dispatcher, autograd and dynamo
    layers around a custom op cost ~50 us a call, more than a decode step's small kernels themselves.
    torch.compile, autograd and opcheck still see the registered op."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    ):
        return op(*args)
    return op._init_fn(*args)  # the function the op was defined from (torch.library keeps it there)


def kernel_for(kernel: str, device: torch.device, backend: str | None) -> tuple[str, Callable | None]:
    """Resolve (face name, kernel function); ("torch", None) means: run the reference."""
    chosen = requested_backend(backend) or default_backend(kernel, device)
    if chosen == "torch":
        return "torch", None
    ok, why = _device_ok(chosen, device)
    fn = None
    if ok:
        fn, why = _find(kernel, chosen)
    if fn is None:
        key = (kernel, chosen, device.type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"blip3o_fast: {kernel}: backend {chosen!r} unavailable on {device.type} ({why}); "
                "using the PyTorch reference",
                stacklevel=3,
            )
        return "torch", None
    return chosen, fn
