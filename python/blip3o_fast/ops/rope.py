"""Rotary position embedding applied to q or k, plus the cos/sin tables of the three RoPE flavours.

One kernel serves every flavour: the tables carry per-token angles, so LLaMA's 1-D RoPE, Qwen2.5-VL's
3-D M-RoPE (each frequency band reads its own position axis) and Lumina's 2-D RoPE (h and w bands
interleaved) differ only in how cos/sin are built, which happens once per forward, not per head.
Layouts: "half" pairs channel i with i + D/2 (LLaMA, Qwen: rotate_half); "interleaved" pairs 2i with
2i+1 (Lumina: complex multiply).

Faces: rope_reference (here), csrc/cpu/rope.cpp, kernels/rope.py, csrc/cuda/rope.cu.
Kernel contract (all faces, every tensor contiguous):
  rope_apply(x[B,T,H,D], cos[B,T,D/2] fp32, sin[B,T,D/2] fp32, out[B,T,H,D], interleaved, inverse)
  inverse=True rotates by -angle: it is the backward of the forward rotation.
"""

from __future__ import annotations

import torch

from blip3o_fast.ops import dispatch
from blip3o_fast.ops.checks import check_float


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    c = cos.float()[:, :, None, :]
    s = sin.float()[:, :, None, :]
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return out.to(x.dtype)


@torch.library.custom_op("blip3o_fast::rope", mutates_args=())
def _rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool, backend: str
) -> torch.Tensor:
    _, fn = dispatch.kernel_for("rope_apply", x.device, backend or None)
    if fn is None:
        return rope_reference(x, cos, -sin if inverse else sin, interleaved)
    out = torch.empty_like(x)
    fn(x, cos, sin, out, interleaved, inverse)
    return out


@_rope.register_fake
def _(x, cos, sin, interleaved, inverse, backend):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    _, cos, sin, interleaved, inverse, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.flags = (interleaved, inverse, backend)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    interleaved, inverse, backend = ctx.flags
    return _rope(dy.contiguous(), cos, sin, interleaved, not inverse, backend), None, None, None, None, None


_rope.register_autograd(_backward, setup_context=_setup)


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate x (B, T, H, D) by per-token angles; cos/sin are (B or 1, T, D/2)."""
    check_float("apply_rope", "x", x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be (B, T, H, D) with even D, got {tuple(x.shape)}")
    b, t, _, d = x.shape
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 3 or tab.shape[1:] != (t, d // 2) or tab.shape[0] not in (1, b):
            raise ValueError(f"apply_rope: {name} must be ({b} or 1, {t}, {d // 2}), got {tuple(tab.shape)}")
        if tab.device != x.device:
            raise ValueError(f"apply_rope: {name} is on {tab.device} but x is on {x.device}")
    cos = cos.float().expand(b, t, d // 2).contiguous()
    sin = sin.float().expand(b, t, d // 2).contiguous()
    if dispatch.requested_backend(backend) == "torch":
        return rope_reference(x, cos, sin, interleaved)
    return _rope(x.contiguous(), cos, sin, interleaved, False, backend or "")


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE inverse frequencies 1 / theta^(2i/dim), i < dim/2, in fp32 (as transformers builds them).

    Always built on the CPU, also inside a torch.device("meta") context: models keep it as a plain
    tensor, which loading weights into a meta-built model would otherwise leave without data."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE tables: positions (B, T) -> cos, sin (B, T, D/2)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL 3-D M-RoPE tables: positions (3, B, T) over (time, height, width); frequency band
    j of the D/2 bands reads axis k where band j lies in the k-th section of mrope_section."""
    if sum(mrope_section) != inv_freq.numel():
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {inv_freq.numel()}")
    # Built by fills on the positions' device: no host-to-device copy, so a CUDA graph can capture it.
    axis = torch.cat([torch.full((n,), k, dtype=torch.int64, device=positions.device)
                      for k, n in enumerate(mrope_section)])
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # (3, B, T, D/2)
    picked = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:]))[0]
    return picked.cos(), picked.sin()


def lumina_2d_cos_sin(height: int, width: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lumina-Next 2-D RoPE for an h x w token grid (row-major): (1, h*w, head_dim/2), bands
    interleaved [h0, w0, h1, w1, ...], each axis with head_dim/4 frequencies 1/theta^(2i/(head_dim/2))."""
    if head_dim % 4:
        raise ValueError(f"lumina_2d_cos_sin: head_dim must be a multiple of 4, got {head_dim}")
    inv = rope_inv_freq(head_dim // 2, theta)
    ah = torch.outer(torch.arange(height, dtype=torch.float32), inv)  # (h, D/4)
    aw = torch.outer(torch.arange(width, dtype=torch.float32), inv)  # (w, D/4)
    grid = torch.stack(
        (ah[:, None, :].expand(height, width, -1), aw[None, :, :].expand(height, width, -1)), dim=-1
    ).reshape(1, height * width, head_dim // 2)
    return grid.cos(), grid.sin()
