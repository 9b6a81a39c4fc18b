"""Decoder residual add + RMSNorm: every built face vs the PyTorch reference (forward, backward through
both outputs, residual None, the rms_norm rounding convention, poisoned outputs, bad input).
Tolerances: see op_testing.py."""

import pytest
import torch
from op_testing import (
    LOW_PRECISION,
    check_close,
    face_device,
    face_params,
    grads_of,
    kernel_fn,
    leaf,
    poison,
)

from blip3o_fast.ops import residual_rms_norm, residual_rms_norm_reference, rms_norm

EPS = 1e-6
FACES = face_params("residual_rms_norm_fwd", "residual_rms_norm_bwd")
SHAPES = [(1, 1), (7, 33), (3, 896), (2, 3, 127)]


def naive(x, r, w, eps):
    """The unfused decoder code run natively in x's dtype: PyTorch's own low-precision error."""
    s = x + r
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w, s


def make_inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x, r = torch.randn(shape, generator=gen), 2 * torch.randn(shape, generator=gen)
    w = 1 + 0.5 * torch.randn(n, generator=gen)
    dy, dres = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return [t.to(dtype).to(device) for t in (x, r, w, dy, dres)]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape):
    x, r, w, dy, dres = make_inputs(shape, dtype, face_device(face), seed=sum(shape) * 13 + len(shape))
    args = [leaf(t) for t in (x, r, w)]
    y, s = residual_rms_norm(args[0], args[1], args[2], EPS, backend=face)
    grads = grads_of((y, s), [dy, dres], args)

    rargs = [leaf(t, torch.float32) for t in (x, r, w)]
    ry, rs = residual_rms_norm_reference(rargs[0], rargs[1], rargs[2], EPS)
    rgrads = grads_of((ry, rs), [dy.float(), dres.float()], rargs)
    nouts, ngrads = [None, None], [None] * 3
    if dtype in LOW_PRECISION:
        nargs = [leaf(t) for t in (x, r, w)]
        nouts = list(naive(*nargs, EPS))
        ngrads = grads_of(tuple(nouts), [dy, dres], nargs)

    # dx cancels to ~0 when N is tiny: measure it against the size of its terms.
    sf = x.float() + r.float()
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS)
    dx_scale = (dres.float().abs() + rstd * (dy.float() * w.float()).abs()).max().item()
    for name, out, ref, nv in zip(("y", "new_residual"), (y, s), (ry, rs), nouts):
        assert out.dtype == dtype
        check_close(name, face, dtype, out, ref, nv)
    for name, g, ref, nv in zip(("dx", "dresidual", "dweight"), grads, rgrads, ngrads):
        assert g.dtype == dtype
        check_close(name, face, dtype, g, ref, nv, floor=dx_scale if name != "dweight" else 0.0)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_follows_rms_norm_rounding(face, dtype):
    """new_residual is x + residual rounded once; y is rms_norm of that rounded row (same face)."""
    x, r, w, _, _ = make_inputs((5, 896), dtype, face_device(face), seed=11)
    y, s = residual_rms_norm(x, r, w, EPS, backend=face)
    if not (face == "triton" and dtype != torch.float32):  # the interpreter truncates its bf16 stores
        assert torch.equal(s, (x.float() + r.float()).to(dtype))
    y_norm = rms_norm(s, w, EPS, backend=face)
    if face == "cpu":
        assert torch.equal(y, y_norm)  # the same row body: bit-identical
    else:
        check_close("y vs rms_norm", face, dtype, y, y_norm.float())


@pytest.mark.parametrize("face", FACES)
def test_residual_none(face):
    """The first layer: new_residual is x itself, y is rms_norm(x), and x's gradient sums both paths."""
    x, _, w, dy, dres = make_inputs((3, 33), torch.float32, face_device(face), seed=2)
    xa, wa = leaf(x), leaf(w)
    y, s = residual_rms_norm(xa, None, wa, EPS, backend=face)
    assert s is xa
    dx, dw = grads_of((y, s), [dy, dres], [xa, wa])
    xr, wr = leaf(x), leaf(w)
    ry = rms_norm(xr, wr, EPS, backend="torch")
    rdx, rdw = grads_of((ry, xr), [dy, dres], [xr, wr])
    check_close("y", face, torch.float32, y, ry)
    check_close("dx", face, torch.float32, dx, rdx, floor=dres.abs().max().item())
    check_close("dweight", face, torch.float32, dw, rdw)


@pytest.mark.parametrize("face", FACES)
def test_dweight_deterministic(face):
    x, r, w, dy, dres = make_inputs((33, 896), torch.float32, face_device(face), seed=3)
    runs = []
    for _ in range(2):
        wa = leaf(w)
        runs.append(grads_of(residual_rms_norm(x, r, wa, EPS, backend=face), [dy, dres], [wa])[0])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean."""
    rows, n = 7, 127
    dev = face_device(face)
    x, r, w, dy, dres = make_inputs((rows, n), dtype, dev, seed=5)
    out, s, rstd = poison(rows, n, dtype=dtype, device=dev), poison(rows, n, dtype=dtype, device=dev), \
        poison(rows, device=dev)
    kernel_fn("residual_rms_norm_fwd", face)(x, r, w, out, s, rstd, EPS)
    assert not out.isnan().any() and not s.isnan().any() and not rstd.isnan().any()
    ry, rs = residual_rms_norm_reference(x.float(), r.float(), w.float(), EPS)
    check_close("y", face, dtype, out, ry, naive(x, r, w, EPS)[0])
    ds, dweight = poison(rows, n, dtype=dtype, device=dev), poison(n, device=dev)
    kernel_fn("residual_rms_norm_bwd", face)(dy, dres, s, w, rstd, ds, dweight)
    assert not ds.isnan().any() and not dweight.isnan().any()


def test_bad_input():
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x"):
        residual_rms_norm(x.to(torch.int32), r, w)
    with pytest.raises(TypeError, match="residual"):
        residual_rms_norm(x, r.half(), w)
    with pytest.raises(ValueError, match="residual"):
        residual_rms_norm(x, r[:3], w)
    with pytest.raises(ValueError, match="weight"):
        residual_rms_norm(x, r, torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        residual_rms_norm(x, r.to("meta"), w)


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x, r, w, dy, dres = make_inputs((3, 16), torch.float32, face_device(face), seed=7)
    torch.library.opcheck(torch.ops.blip3o_fast.residual_rms_norm_fwd.default,
                          (x.requires_grad_(), r, w.requires_grad_(), EPS, face))
    _, s, rstd = torch.ops.blip3o_fast.residual_rms_norm_fwd(x.detach(), r, w.detach(), EPS, face)
    torch.library.opcheck(torch.ops.blip3o_fast.residual_rms_norm_bwd.default, (dy, dres, s, w.detach(), rstd, face))
