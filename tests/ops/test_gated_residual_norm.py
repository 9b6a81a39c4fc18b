"""Fused DiT block epilogue (gated residual + sandwich RMSNorm + next adaLN RMSNorm): every built
face vs the PyTorch reference (forward, backward, with and without the next norm, poisoned outputs,
bad input, the scalar CPU path). Tolerances: see op_testing.py."""

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
    run_scalar_child,
)

from blip3o_fast.ops import gated_residual_norm, gated_residual_norm_reference

EPS = 1e-5
FACES = face_params("gated_residual_norm_fwd", "gated_residual_norm_bwd")
SHAPES = [(1, 1, 1), (2, 7, 127), (3, 5, 1000), (2, 64, 1792)]  # (B, T, N)


def naive(x, y, wy, gate, wn, sn, eps):
    """The reference math run natively in x's dtype: PyTorch's own low-precision error."""
    def rms(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    xo = x + gate[:, None, :] * rms(y) * wy
    if wn is None:
        return (xo,)
    return xo, rms(xo) * wn * (1 + sn[:, None, :])


def make_inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b, _, n = shape
    x, y = torch.randn(shape, generator=gen), 2 * torch.randn(shape, generator=gen)
    wy, wn = 1 + 0.5 * torch.randn(n, generator=gen), 1 + 0.5 * torch.randn(n, generator=gen)
    gate, sn = 0.5 * torch.randn(b, n, generator=gen), 0.5 * torch.randn(b, n, generator=gen)
    dxo, dh = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return [t.to(dtype).to(device) for t in (x, y, wy, gate, wn, sn, dxo, dh)]


def run(fn, inputs, next_norm, douts):
    """Forward with `next_norm` on or off, then grads of every input given the output grads."""
    args = inputs if next_norm else inputs[:4]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return list(outs), grads_of(outs, douts[: len(outs)], args)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("next_norm", [True, False], ids=["next", "last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape, next_norm):
    x, y, wy, gate, wn, sn, dxo, dh = make_inputs(shape, dtype, face_device(face), seed=sum(shape) * 7)
    douts = [dxo, dh]
    outs, grads = run(lambda *a: gated_residual_norm(*a, eps=EPS, backend=face),
                      [leaf(t) for t in (x, y, wy, gate, wn, sn)], next_norm, douts)
    routs, rgrads = run(lambda *a: gated_residual_norm_reference(*a, eps=EPS),
                        [leaf(t, torch.float32) for t in (x, y, wy, gate, wn, sn)], next_norm,
                        [d.float() for d in douts])
    nouts, ngrads = [None] * len(routs), [None] * len(rgrads)
    if dtype in LOW_PRECISION:
        nouts, ngrads = run(lambda *a: naive(*(list(a) + [None, None])[:6], EPS),
                            [leaf(t) for t in (x, y, wy, gate, wn, sn)], next_norm, douts)

    # dx and dy cancel to ~0 when N is tiny: measure them against the size of their terms.
    xf, yf = x.float(), y.float()
    ry = torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + EPS)
    xo = xf + gate.float()[:, None, :] * yf * ry * wy.float()
    rx = torch.rsqrt(xo.pow(2).mean(-1, keepdim=True) + EPS)
    gh = dh.float() * wn.float() * (1 + sn.float()[:, None, :]) if next_norm else torch.zeros_like(xf)
    dx_scale = (dxo.float().abs() + rx * gh.abs()).max().item()
    dy_scale = (ry * dx_scale * (gate.float()[:, None, :] * wy.float()).abs()).max().item()
    floors = {"dx": dx_scale, "dy": dy_scale}

    names = ["x_out", "h"][: len(outs)]
    for name, out, ref, nv in zip(names, outs, routs, nouts):
        assert out.dtype == dtype
        check_close(name, face, dtype, out, ref, nv)
    gnames = ["dx", "dy", "dy_weight", "dgate", "dnext_weight", "dnext_scale"]
    for name, g, ref, nv in zip(gnames, grads, rgrads, ngrads):
        assert g.dtype == dtype
        check_close(name, face, dtype, g, ref, nv, floor=floors.get(name, 0.0))


@pytest.mark.parametrize("face", FACES)
def test_grads_deterministic(face):
    x, y, wy, gate, wn, sn, dxo, dh = make_inputs((2, 33, 1000), torch.float32, face_device(face), seed=3)
    runs = []
    for _ in range(2):
        params = [leaf(t) for t in (wy, gate, wn, sn)]
        xo, h = gated_residual_norm(x, y, params[0], params[1], params[2], params[3], EPS, backend=face)
        runs.append(grads_of((xo, h), [dxo, dh], params))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean."""
    b, t, n = 2, 7, 127
    dev = face_device(face)
    x, y, wy, gate, wn, sn, dxo, dh = make_inputs((b, t, n), dtype, dev, seed=5)
    xo, h = poison(b, t, n, dtype=dtype, device=dev), poison(b, t, n, dtype=dtype, device=dev)
    ry, rx = poison(b * t, device=dev), poison(b * t, device=dev)
    kernel_fn("gated_residual_norm_fwd", face)(x, y, wy, gate, wn, sn, xo, h, ry, rx, EPS)
    assert not any(t.isnan().any() for t in (xo, h, ry, rx))
    rxo, rh = gated_residual_norm_reference(*(t.float() for t in (x, y, wy, gate, wn, sn)), eps=EPS)
    check_close("x_out", face, dtype, xo, rxo)
    check_close("h", face, dtype, h, rh)

    outs = [poison(b, t, n, dtype=dtype, device=dev) for _ in range(2)]
    outs += [poison(n, device=dev), poison(b, n, device=dev), poison(n, device=dev), poison(b, n, device=dev)]
    kernel_fn("gated_residual_norm_bwd", face)(dxo, dh, x, y, wy, gate, wn, sn, ry, rx, *outs)
    assert not any(t.isnan().any() for t in outs)


def test_bad_input():
    x, y, w, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 8)
    with pytest.raises(TypeError, match="x"):
        gated_residual_norm(x.to(torch.int32), y, w, g)
    with pytest.raises(TypeError, match="gate"):
        gated_residual_norm(x, y, w, g.half())
    with pytest.raises(ValueError, match="x"):
        gated_residual_norm(x[0], y[0], w, g)
    with pytest.raises(ValueError, match="y"):
        gated_residual_norm(x, y[:, :2], w, g)
    with pytest.raises(ValueError, match="y_weight"):
        gated_residual_norm(x, y, torch.randn(7), g)
    with pytest.raises(ValueError, match="next_scale"):
        gated_residual_norm(x, y, w, g, w, torch.randn(1, 8))
    with pytest.raises(ValueError, match="together"):
        gated_residual_norm(x, y, w, g, w)
    with pytest.raises(ValueError, match="gate"):
        gated_residual_norm(x, y, w, g.to("meta"))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("next_norm", [True, False], ids=["next", "last"])
def test_opcheck(face, next_norm):
    x, y, wy, gate, wn, sn, dxo, dh = make_inputs((2, 3, 16), torch.float32, face_device(face), seed=7)
    if not next_norm:
        wn = sn = None
    args = (x, y.requires_grad_(), wy.requires_grad_(), gate, wn, sn, EPS, face)
    torch.library.opcheck(torch.ops.blip3o_fast.gated_residual_norm_fwd.default, args)
    _, _, ry, rx = torch.ops.blip3o_fast.gated_residual_norm_fwd(x, y.detach(), wy.detach(), gate, wn, sn, EPS, face)
    torch.library.opcheck(torch.ops.blip3o_fast.gated_residual_norm_bwd.default,
                          (dxo, dh if next_norm else None, x, y.detach(), wy.detach(), gate, wn, sn, ry,
                           rx if next_norm else None, face))


_SCALAR_CHILD = r'''
import json, torch
from blip3o_fast.ops import available_backends, gated_residual_norm, gated_residual_norm_reference
errs = {}
for dt in (torch.float32, torch.bfloat16):
    for shape in ((1, 1, 1), (2, 5, 13), (3, 4, 1000)):
        g = torch.Generator().manual_seed(sum(shape))
        b, t, n = shape
        raw = [torch.randn(shape, generator=g), torch.randn(shape, generator=g), 1 + torch.randn(n, generator=g),
               torch.randn(b, n, generator=g), 1 + torch.randn(n, generator=g), torch.randn(b, n, generator=g)]
        ins = [r.to(dt) for r in raw]
        douts = [torch.randn(shape, generator=g).to(dt) for _ in range(2)]
        a = [t.clone().requires_grad_() for t in ins]
        outs = gated_residual_norm(*a, backend="cpu")
        grads = torch.autograd.grad(outs, a, douts)
        r = [t.float().requires_grad_() for t in ins]
        routs = gated_residual_norm_reference(*r)
        rgrads = torch.autograd.grad(routs, r, [d.float() for d in douts])
        def rel(p, q, floor=0.0):
            return ((p.float() - q).abs().max() / max(q.abs().max().item(), floor, 1e-30)).item()
        # dx/dy can cancel to ~0 on tiny rows: the floor is the size of the incoming gradients.
        floor = max(d.float().abs().max().item() for d in douts) * 4
        key = f"{dt} {shape}"
        errs[key] = max([rel(o, q) for o, q in zip(outs, routs)] + [rel(p, q, floor) for p, q in zip(grads, rgrads)])
print(json.dumps(errs))
'''


def test_cpu_scalar_path():
    """BLIP3O_FAST_CPU_SCALAR=1 (read once per process) takes the scalar row bodies: fwd + bwd vs the reference."""
    errs = run_scalar_child(_SCALAR_CHILD)
    for key, err in errs.items():
        tol = 1e-5 if "float32" in key else 2e-2  # bf16: one output rounding (2^-8) plus the grads' own
        assert err <= tol, f"scalar path {key}: error {err:.3g} > {tol}"
