"""adaLN RMSNorm-zero modulation: every built face vs the PyTorch reference (forward, backward,
poisoned outputs, bad input). Tolerances: see op_testing.py."""

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

from blip3o_fast.ops import rms_norm_modulate, rms_norm_modulate_reference

EPS = 1e-5
FACES = face_params("rms_norm_modulate_fwd", "rms_norm_modulate_bwd")
SHAPES = [(1, 1, 1), (1, 7, 3), (2, 7, 127), (3, 5, 1000), (2, 64, 1792)]  # (B, T, N)


def naive(x, w, scale, eps):
    """The reference math run natively in x's dtype: PyTorch's own low-precision error."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w * (1 + scale[:, None, :])


def make_inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b, _, n = shape
    x = torch.randn(shape, generator=gen)
    w = 1 + 0.5 * torch.randn(n, generator=gen)
    scale = 0.5 * torch.randn(b, n, generator=gen)
    dy = torch.randn(shape, generator=gen)
    return [t.to(dtype).to(device) for t in (x, w, scale, dy)]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape):
    x, w, scale, dy = make_inputs(shape, dtype, face_device(face), seed=sum(shape) * 13)
    xa, wa, sa = leaf(x), leaf(w), leaf(scale)
    out = rms_norm_modulate(xa, wa, sa, EPS, backend=face)
    dx, dw, ds = grads_of(out, dy, [xa, wa, sa])

    xr, wr, sr = leaf(x, torch.float32), leaf(w, torch.float32), leaf(scale, torch.float32)
    ref = rms_norm_modulate_reference(xr, wr, sr, EPS)
    rdx, rdw, rds = grads_of(ref, dy.float(), [xr, wr, sr])
    nout = ndx = ndw = nds = None
    if dtype in LOW_PRECISION:
        xn, wn, sn = leaf(x), leaf(w), leaf(scale)
        nout = naive(xn, wn, sn, EPS)
        ndx, ndw, nds = grads_of(nout, dy, [xn, wn, sn])

    # As for RMSNorm, dx cancels to ~0 when N is tiny: measure it against the size of its terms.
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
    g = dy.float() * w.float() * (1 + scale.float()[:, None, :])
    dx_scale = (rstd * g.abs()).max().item()
    assert out.dtype == dx.dtype == dw.dtype == ds.dtype == dtype
    check_close("out", face, dtype, out, ref, nout)
    check_close("dx", face, dtype, dx, rdx, ndx, floor=dx_scale)
    check_close("dweight", face, dtype, dw, rdw, ndw)
    check_close("dscale", face, dtype, ds, rds, nds)


@pytest.mark.parametrize("face", FACES)
def test_grads_deterministic(face):
    x, w, scale, dy = make_inputs((2, 33, 1000), torch.float32, face_device(face), seed=3)
    runs = []
    for _ in range(2):
        wa, sa = leaf(w), leaf(scale)
        runs.append(grads_of(rms_norm_modulate(x, wa, sa, EPS, backend=face), dy, [wa, sa]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean."""
    b, t, n = 2, 7, 127
    dev = face_device(face)
    x, w, scale, dy = make_inputs((b, t, n), dtype, dev, seed=5)
    out, rstd = poison(b, t, n, dtype=dtype, device=dev), poison(b * t, device=dev)
    kernel_fn("rms_norm_modulate_fwd", face)(x, w, scale, out, rstd, EPS)
    assert not out.isnan().any() and not rstd.isnan().any()
    check_close("out", face, dtype, out, rms_norm_modulate_reference(x.float(), w.float(), scale.float(), EPS))
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS).reshape(-1)
    check_close("rstd", face, torch.float32, rstd, ref_rstd)

    dx = poison(b, t, n, dtype=dtype, device=dev)
    dweight, dscale = poison(n, device=dev), poison(b, n, device=dev)
    kernel_fn("rms_norm_modulate_bwd", face)(dy, x, w, scale, ref_rstd, dx, dweight, dscale)
    assert not dx.isnan().any() and not dweight.isnan().any() and not dscale.isnan().any()


def test_bad_input():
    x, w, scale = torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 8)
    with pytest.raises(TypeError, match="x"):
        rms_norm_modulate(x.to(torch.int32), w, scale)
    with pytest.raises(TypeError, match="scale"):
        rms_norm_modulate(x, w, scale.half())
    with pytest.raises(ValueError, match="x"):
        rms_norm_modulate(x[0], w, scale)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_modulate(x, torch.randn(7), scale)
    with pytest.raises(ValueError, match="scale"):
        rms_norm_modulate(x, w, torch.randn(1, 8))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_modulate(x, w.to("meta"), scale)


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x, w, scale, dy = make_inputs((2, 3, 16), torch.float32, face_device(face), seed=7)
    args = (x, w.requires_grad_(), scale.requires_grad_(), EPS, face)
    torch.library.opcheck(torch.ops.blip3o_fast.rms_norm_modulate_fwd.default, args)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS).reshape(-1)
    torch.library.opcheck(torch.ops.blip3o_fast.rms_norm_modulate_bwd.default,
                          (dy, x, w.detach(), scale.detach(), rstd, face))
