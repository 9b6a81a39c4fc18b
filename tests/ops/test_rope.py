"""RoPE: every built face vs the PyTorch reference, both layouts and the inverse rotation
(forward, backward, poisoned outputs, bad input). Tolerances: see op_testing.py."""

import pytest
import torch
from op_testing import (
    DTYPES,
    LOW_PRECISION,
    check_close,
    face_device,
    face_params,
    grads_of,
    kernel_fn,
    leaf,
    poison,
)

from blip3o_fast.ops import apply_rope, rope_reference

FACES = face_params("rope_apply")
LAYOUTS = pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
SHAPES = [(1, 1, 1, 2), (2, 7, 3, 6), (1, 5, 14, 64), (2, 3, 4, 128)]  # (B, T, H, D)


def naive(x, cos, sin, interleaved):
    """The reference math run natively in x's dtype: PyTorch's own low-precision error."""
    c, s = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def make_inputs(shape, dtype, device, seed, table_batch=None):
    gen = torch.Generator().manual_seed(seed)
    b, t, _, d = shape
    x = torch.randn(shape, generator=gen)
    angles = 10 * torch.rand(table_batch or b, t, d // 2, generator=gen)
    dy = torch.randn(shape, generator=gen)
    return x.to(dtype).to(device), angles.cos().to(device), angles.sin().to(device), dy.to(dtype).to(device)


def run_and_check(face, dtype, shape, interleaved, table_batch=None):
    x, cos, sin, dy = make_inputs(shape, dtype, face_device(face), sum(shape) * 7 + interleaved, table_batch)
    xa = leaf(x)
    out = apply_rope(xa, cos, sin, interleaved=interleaved, backend=face)
    (dx,) = grads_of(out, dy, [xa])

    full_cos, full_sin = cos.expand(shape[0], -1, -1), sin.expand(shape[0], -1, -1)
    xr = leaf(x, torch.float32)
    ref = rope_reference(xr, full_cos, full_sin, interleaved)
    (rdx,) = grads_of(ref, dy.float(), [xr])
    nout = ndx = None
    if dtype in LOW_PRECISION:
        xn = leaf(x)
        nout = naive(xn, full_cos, full_sin, interleaved)
        (ndx,) = grads_of(nout, dy, [xn])
    assert out.dtype == dtype and dx.dtype == dtype
    check_close("out", face, dtype, out, ref, nout)
    check_close("dx", face, dtype, dx, rdx, ndx)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@LAYOUTS
def test_matches_reference(face, dtype, shape, interleaved):
    run_and_check(face, dtype, shape, interleaved)


@pytest.mark.parametrize("face", FACES)
@LAYOUTS
def test_broadcast_tables(face, interleaved):
    """cos/sin with batch 1 serve every batch row (Lumina's 2-D tables)."""
    run_and_check(face, torch.float32, (3, 4, 2, 8), interleaved, table_batch=1)


@pytest.mark.parametrize("face", FACES)
@LAYOUTS
def test_inverse(face, interleaved):
    """inverse=True rotates by -angle, and undoes the forward rotation."""
    x, cos, sin, _ = make_inputs((2, 5, 3, 64), torch.float32, face_device(face), seed=11)
    op = torch.ops.blip3o_fast.rope
    back = op(x, cos, sin, interleaved, True, face)
    check_close("inverse", face, torch.float32, back, rope_reference(x, cos, -sin, interleaved))
    check_close("round trip", face, torch.float32, op(op(x, cos, sin, interleaved, False, face), cos, sin,
                                                       interleaved, True, face), x)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@LAYOUTS
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_poisoned_outputs(face, dtype, interleaved, inverse):
    """The kernel writes every element of its output: a NaN-filled buffer comes back clean."""
    shape = (2, 7, 3, 6)
    x, cos, sin, _ = make_inputs(shape, dtype, face_device(face), seed=13)
    out = poison(*shape, dtype=dtype, device=x.device)
    kernel_fn("rope_apply", face)(x, cos, sin, out, interleaved, inverse)
    assert not out.isnan().any()
    check_close("out", face, dtype, out, rope_reference(x.float(), cos, -sin if inverse else sin, interleaved))


def test_bad_input():
    x = torch.randn(1, 4, 2, 8)
    cos = sin = torch.randn(1, 4, 4)
    with pytest.raises(TypeError, match="x"):
        apply_rope(x.to(torch.int64), cos, sin)
    with pytest.raises(ValueError, match="x"):
        apply_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="x"):
        apply_rope(torch.randn(1, 4, 2, 7), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(x, torch.randn(1, 4, 3), sin)
    with pytest.raises(ValueError, match="sin"):
        apply_rope(x, cos, torch.randn(2, 4, 4).expand(2, 4, 4)[:, :3])
    with pytest.raises(ValueError, match="cos"):
        apply_rope(x, torch.randn(1, 4, 4, device="meta"), sin)


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x, cos, sin, _ = make_inputs((1, 3, 2, 8), torch.float32, face_device(face), seed=17)
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.blip3o_fast.rope.default, (x.requires_grad_(), cos, sin, interleaved, False, face))
