"""RMSNorm: every built face vs the PyTorch reference (forward, backward, poisoned outputs, bad input).
Tolerances: see op_testing.py."""

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

from blip3o_fast.ops import rms_norm, rms_norm_reference

EPS = 1e-6
FACES = face_params("rms_norm_fwd", "rms_norm_bwd")
SHAPES = [(1, 1), (7, 1), (1, 3), (7, 3), (1, 127), (7, 127), (1, 1000), (7, 1000), (33, 3584)]


def naive(x, w, eps):
    """The reference math run natively in x's dtype: PyTorch's own low-precision error."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def make_inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=gen)
    w = 1 + 0.5 * torch.randn(n, generator=gen)
    dy = torch.randn(shape, generator=gen)
    return [t.to(dtype).to(device) for t in (x, w, dy)]


def run_and_check(face, dtype, shape):
    x, w, dy = make_inputs(shape, dtype, face_device(face), seed=sum(shape) * 31 + len(shape))
    xa, wa = leaf(x), leaf(w)
    out = rms_norm(xa, wa, EPS, backend=face)
    dx, dw = grads_of(out, dy, [xa, wa])

    xr, wr = leaf(x, torch.float32), leaf(w, torch.float32)
    ref = rms_norm_reference(xr, wr, EPS)
    rdx, rdw = grads_of(ref, dy.float(), [xr, wr])
    nout = ndx = ndw = None
    if dtype in LOW_PRECISION:
        xn, wn = leaf(x), leaf(w)
        nout = naive(xn, wn, EPS)
        ndx, ndw = grads_of(nout, dy, [xn, wn])

    # dx = rstd * (g - xhat * mean(g * xhat)) cancels to ~0 when N is tiny (xhat^2 ~ 1 at N=1):
    # measure its error against the size of the terms, rstd * |dy * w|, not the tiny result.
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
    dx_scale = (rstd * (dy.float() * w.float()).abs()).max().item()
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    check_close("out", face, dtype, out, ref, nout)
    check_close("dx", face, dtype, dx, rdx, ndx, floor=dx_scale)
    check_close("dweight", face, dtype, dw, rdw, ndw)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape):
    run_and_check(face, dtype, shape)


@pytest.mark.parametrize("face", FACES)
def test_leading_dims(face):
    run_and_check(face, torch.float32, (2, 3, 127))


@pytest.mark.parametrize("face", FACES)
def test_dweight_deterministic(face):
    x, w, dy = make_inputs((33, 1000), torch.float32, face_device(face), seed=3)
    grads = []
    for _ in range(2):
        wa = leaf(w)
        grads.append(grads_of(rms_norm(x, wa, EPS, backend=face), dy, [wa])[0])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean."""
    rows, n = 7, 127
    dev = face_device(face)
    x, w, dy = make_inputs((rows, n), dtype, dev, seed=5)
    out, rstd = poison(rows, n, dtype=dtype, device=dev), poison(rows, device=dev)
    kernel_fn("rms_norm_fwd", face)(x, w, out, rstd, EPS)
    assert not out.isnan().any() and not rstd.isnan().any()
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    check_close("out", face, dtype, out, rms_norm_reference(x.float(), w.float(), EPS))
    check_close("rstd", face, torch.float32, rstd, ref_rstd)

    dx, dweight = poison(rows, n, dtype=dtype, device=dev), poison(n, device=dev)
    kernel_fn("rms_norm_bwd", face)(dy, x, w, ref_rstd, dx, dweight)
    assert not dx.isnan().any() and not dweight.isnan().any()
    assert dweight.dtype == torch.float32


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.to(torch.int32), torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.numpy(), torch.ones(8))


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x, w, dy = make_inputs((3, 16), torch.float32, face_device(face), seed=7)
    torch.library.opcheck(torch.ops.blip3o_fast.rms_norm_fwd.default, (x, w.requires_grad_(), EPS, face))
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    torch.library.opcheck(torch.ops.blip3o_fast.rms_norm_bwd.default, (dy, x, w.detach(), rstd, face))
