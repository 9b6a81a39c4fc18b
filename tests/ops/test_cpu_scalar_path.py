"""The C++ CPU kernels' scalar path (the one machines without AVX2/FMA take), forced with
BLIP3O_FAST_CPU_SCALAR=1. The switch is read once per process, so the checks run in one subprocess.

Every cpu-face kernel, forward and backward, against its PyTorch reference on odd shapes (sizes
that are not multiples of 8 and rows of one element), outputs poisoned with NaN first:
fp32 within 1e-5 relative; bf16 outputs within 2x the error torch makes computing the same formula
in bf16 (against the fp32 reference); fp32 gradients of bf16 inputs within 1e-5 of the reference
run on the same inputs.
"""

from __future__ import annotations

import pytest
from op_testing import run_scalar_child

_CHILD = r'''
import importlib, json
import torch
import torch.nn.functional as F
import blip3o_fast._C as C

RN, RP, SW, RM = (importlib.import_module("blip3o_fast.ops." + m)
                  for m in ("rms_norm", "rope", "swiglu", "rms_norm_modulate"))
torch.manual_seed(0)
failures = []


def err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(name, got, ref32, lowp=None):
    """lowp: the same formula run by torch in got's 16-bit dtype; None for fp32 outputs."""
    e = err(got, ref32)
    bound = 1e-5 if lowp is None else 2 * err(lowp, ref32)
    if not e <= bound:
        failures.append(f"{name}: error {e:.3g} > bound {bound:.3g}")


def nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def rms_formula(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def with_grads(fn, dy, *inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves]


for dt in (torch.float32, torch.bfloat16):
    tag = str(dt).split(".")[-1]
    low = dt != torch.float32
    for rows, n in ((1, 1), (7, 3), (3, 127), (2, 1000), (5, 9)):
        x = torch.randn(rows, n).to(dt)
        w = (1 + 0.5 * torch.randn(n)).to(dt)
        dy = torch.randn(rows, n).to(dt)
        out, rstd = nan(rows, n, dtype=dt), nan(rows)
        C.rms_norm_fwd(x, w, out, rstd, 1e-6)
        ref, rstd_ref = RN._reference_fwd(x.float(), w.float(), 1e-6)
        check(f"rms_norm_fwd {tag} {rows}x{n}", out, ref, rms_formula(x, w, 1e-6) if low else None)
        check(f"rms_norm_fwd rstd {tag} {rows}x{n}", rstd, rstd_ref)
        dx, dw = nan(rows, n, dtype=dt), nan(n)
        C.rms_norm_bwd(dy, x, w, rstd, dx, dw)
        dx_ref, dw_ref = RN._reference_bwd(dy.float(), x.float(), w.float(), rstd)
        dx_low = with_grads(lambda a, b: rms_formula(a, b, 1e-6), dy, x, w)[0] if low else None
        check(f"rms_norm_bwd dx {tag} {rows}x{n}", dx, dx_ref, dx_low)
        check(f"rms_norm_bwd dweight {tag} {rows}x{n}", dw, dw_ref)

    for b, t, n in ((1, 1, 1), (2, 7, 3), (3, 5, 127), (2, 3, 1000)):
        x = torch.randn(b, t, n).to(dt)
        w = (1 + 0.5 * torch.randn(n)).to(dt)
        s = (0.3 * torch.randn(b, n)).to(dt)
        dy = torch.randn(b, t, n).to(dt)
        formula = lambda x_, w_, s_: rms_formula(x_, w_, 1e-5) * (1 + s_[:, None, :])
        out, rstd = nan(b, t, n, dtype=dt), nan(b * t)
        C.rms_norm_modulate_fwd(x, w, s, out, rstd, 1e-5)
        ref, rstd_ref = RM._reference_fwd(x.float(), w.float(), s.float(), 1e-5)
        check(f"rms_norm_modulate_fwd {tag} {b}x{t}x{n}", out, ref, formula(x, w, s) if low else None)
        check(f"rms_norm_modulate_fwd rstd {tag} {b}x{t}x{n}", rstd, rstd_ref)
        dx, dw, ds = nan(b, t, n, dtype=dt), nan(n), nan(b, n)
        C.rms_norm_modulate_bwd(dy, x, w, s, rstd, dx, dw, ds)
        dx_ref, dw_ref, ds_ref = RM._reference_bwd(dy.float(), x.float(), w.float(), s.float(), rstd)
        check(f"rms_norm_modulate_bwd dx {tag} {b}x{t}x{n}", dx, dx_ref,
              with_grads(formula, dy, x, w, s)[0] if low else None)
        check(f"rms_norm_modulate_bwd dweight {tag} {b}x{t}x{n}", dw, dw_ref)
        check(f"rms_norm_modulate_bwd dscale {tag} {b}x{t}x{n}", ds, ds_ref)

    for b, t, h, d in ((1, 1, 1, 2), (2, 3, 2, 6), (1, 7, 3, 64), (1, 2, 2, 128), (1, 3, 1, 18)):
        x = torch.randn(b, t, h, d).to(dt)
        angle = 3 * torch.randn(b, t, d // 2)
        cos, sin = angle.cos(), angle.sin()
        for interleaved in (False, True):
            for inverse in (False, True):
                out = nan(b, t, h, d, dtype=dt)
                C.rope_apply(x, cos, sin, out, interleaved, inverse)
                s = -sin if inverse else sin
                ref = RP.rope_reference(x.float(), cos, s, interleaved)
                low_out = None
                if low:
                    c_, s_ = cos.to(dt)[:, :, None], s.to(dt)[:, :, None]
                    a, bb = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
                    ra, rb = a * c_ - bb * s_, bb * c_ + a * s_
                    low_out = torch.stack((ra, rb), -1).flatten(-2) if interleaved else torch.cat((ra, rb), -1)
                check(f"rope_apply {tag} {b}x{t}x{h}x{d} interleaved={interleaved} inverse={inverse}",
                      out, ref, low_out)

    for n in (1, 3, 9, 100, 1031):
        g = (4 * torch.randn(n)).to(dt)
        u = torch.randn(n).to(dt)
        dy = torch.randn(n).to(dt)
        formula = lambda g_, u_: F.silu(g_) * u_
        out = nan(n, dtype=dt)
        C.swiglu_fwd(g, u, out)
        check(f"swiglu_fwd {tag} {n}", out, SW.swiglu_reference(g.float(), u.float()), formula(g, u) if low else None)
        dg, du = nan(n, dtype=dt), nan(n, dtype=dt)
        C.swiglu_bwd(dy, g, u, dg, du)
        dg_ref, du_ref = SW._reference_bwd(dy.float(), g.float(), u.float())
        dg_low, du_low = with_grads(formula, dy, g, u) if low else (None, None)
        check(f"swiglu_bwd dgate {tag} {n}", dg, dg_ref, dg_low)
        check(f"swiglu_bwd dup {tag} {n}", du, du_ref, du_low)

print(json.dumps({"features": C.cpu_features(), "failures": failures}))
'''


@pytest.fixture(scope="module")
def scalar_run() -> dict:
    return run_scalar_child(_CHILD)


def test_scalar_path_is_selected(scalar_run):
    assert scalar_run["features"] == "scalar"


def test_scalar_kernels_match_reference(scalar_run):
    assert scalar_run["failures"] == []
