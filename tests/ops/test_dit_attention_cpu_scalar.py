"""The fused DiT attention C++ kernels' scalar path (what CPUs without AVX2/FMA run), forced with
BLIP3O_FAST_CPU_SCALAR=1, which is read once per process: so the checks run in one subprocess.

dit_attention_fwd (out, out_ungated, lse) and dit_attention_bwd (every gradient) against the reference
on self/cross attention, GQA, gate, residual, a key mask with a fully masked query row, odd head dims;
outputs poisoned with NaN first. fp32 within 1e-5 relative; bf16 within 2x the error PyTorch makes
running the same math natively in bf16 (autograd included for gradients), floored at one bf16 eps.
"""

from __future__ import annotations

import pytest
from op_testing import run_scalar_child

_CHILD = r'''
import importlib, json, math
import torch
import blip3o_fast._C as C
from blip3o_fast.ops.rope import rope_reference

DA = importlib.import_module("blip3o_fast.ops.dit_attention")
torch.manual_seed(0)
failures = []


def err(a, b, floor=0.0):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / max(b.abs().max().item(), floor, 1e-30)).item()


def native(q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, res, rope_k):
    """The reference formula run natively in q's dtype: PyTorch's own low-precision error."""
    dt, (b, tq, hq, d), hkv = q.dtype, q.shape, k.shape[2]

    def ln(x, w, bias):
        n = x.shape[2] * x.shape[3]
        return torch.nn.functional.layer_norm(x.flatten(2), (n,), w, bias, 1e-5).view(x.shape)

    def rope(x):
        c, s = cos.to(dt)[:, :, None, :], sin.to(dt)[:, :, None, :]
        a, bb = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - bb * s, a * s + bb * c), -1).flatten(-2)

    qn = rope(ln(q, qw, qb))
    kn = ln(k, kw, kb) if kw is not None else k
    kn = rope(kn) if rope_k else kn
    kh = kn.transpose(1, 2).repeat_interleave(hq // hkv, 1)
    vh = v.transpose(1, 2).repeat_interleave(hq // hkv, 1)
    s = qn.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = (torch.softmax(s, -1).nan_to_num(0.0) @ vh).transpose(1, 2)
    o = o * gate.tanh().view(1, 1, hq, 1) if gate is not None else o
    return o + res if res is not None else o


def ref_lse(q, k, qw, qb, kw, kb, cos, sin, mask, rope_k):
    qn = rope_reference(DA._layer_norm_heads(q, qw, qb), cos, sin, interleaved=True).float()
    kn = DA._layer_norm_heads(k, kw, kb) if kw is not None else k.float()
    kn = rope_reference(kn, cos, sin, interleaved=True).float() if rope_k else kn
    kh = kn.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], 1)
    s = qn.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, -1)


def nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


CASES = [  # b, tq, tk, hq, hkv, d, rope_k (self), k LayerNorm, gate, residual, mask
    (2, 33, 33, 3, 3, 64, True, True, False, False, True),
    (2, 9, 9, 2, 2, 128, True, True, True, True, False),
    (2, 12, 7, 4, 4, 64, False, False, True, True, True),
    (2, 10, 13, 4, 2, 64, False, True, True, False, True),
    (1, 11, 11, 3, 3, 6, True, True, True, False, False),
    (2, 5, 13, 2, 1, 10, False, False, True, True, False),
]

for dt in (torch.float32, torch.bfloat16):
    low = dt != torch.float32
    for b, tq, tk, hq, hkv, d, rope_k, kln, gated, resid, masked in CASES:
        tag = f"{str(dt)[6:]} b{b} tq{tq} tk{tk} hq{hq} hkv{hkv} d{d} rope_k={rope_k}"
        q, k, v = torch.randn(b, tq, hq, d).to(dt), torch.randn(b, tk, hkv, d).to(dt), torch.randn(b, tk, hkv, d).to(dt)
        qw, qb = (1 + 0.3 * torch.randn(hq * d)).to(dt), (0.2 * torch.randn(hq * d)).to(dt)
        kw = (1 + 0.3 * torch.randn(hkv * d)).to(dt) if kln else None
        kb = (0.2 * torch.randn(hkv * d)).to(dt) if kln else None
        ang = 3 * torch.randn(b, tq, d // 2)
        cos, sin = ang.cos(), ang.sin()
        gate = torch.randn(hq).to(dt) if gated else None
        res = torch.randn(b, tq, hq, d).to(dt) if resid else None
        mask = None
        if masked:
            mask = torch.rand(b, tk) > 0.3
            mask[0, 0] = True
            mask[-1] = False  # every query of the last batch sees no key: o = 0, lse = -inf
        f32 = [t.float() if t is not None else None for t in (q, k, v, qw, qb, kw, kb)]
        gate32, res32 = (gate.float() if gated else None), (res.float() if resid else None)

        out, og, lse = nan(b, tq, hq, d, dtype=dt), nan(b, tq, hq, d, dtype=dt), nan(b, hq, tq)
        C.dit_attention_fwd(q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, res, rope_k, out, lse, og)
        ref = DA.dit_attention_reference(*f32, cos, sin, key_mask=mask, gate=gate32, residual=res32, rope_k=rope_k)
        ref_o = DA.dit_attention_reference(*f32, cos, sin, key_mask=mask, rope_k=rope_k)
        bound = lambda naive, r: max(2 * err(naive, r), torch.finfo(dt).eps) if low else 1e-5
        for name, got, r, nv in (("out", out, ref, (q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, res)),
                                 ("out_ungated", og, ref_o, (q, k, v, qw, qb, kw, kb, cos, sin, mask, None, None))):
            e, tol = err(got, r), bound(native(*nv, rope_k) if low else None, r)
            if not e <= tol:
                failures.append(f"fwd {name} {tag}: {e:.3g} > {tol:.3g}")
        lr = ref_lse(*f32[:2], *f32[3:], cos, sin, mask, rope_k)
        fin = torch.isfinite(lr)
        if not (torch.isneginf(lse[~fin]).all() and err(lse[fin], lr[fin]) <= 1e-5):
            failures.append(f"fwd lse {tag}: {err(lse[fin], lr[fin]):.3g}")

        dout = torch.randn(b, tq, hq, d).to(dt)
        refs = DA._reference_bwd(dout.float(), *f32, cos, sin, mask, gate32, rope_k)
        dq, dk, dv = nan(b, tq, hq, d, dtype=dt), nan(b, tk, hkv, d, dtype=dt), nan(b, tk, hkv, d, dtype=dt)
        dqw, dqb = nan(hq * d), nan(hq * d)
        dkw, dkb = (nan(hkv * d), nan(hkv * d)) if kln else (None, None)
        dg = nan(hq) if gated else None
        C.dit_attention_bwd(dout, q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, rope_k, og, lse, dq, dk, dv,
                            dqw, dqb, dkw, dkb, dg)
        naive = [None] * 8
        if low:
            leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, qw, qb, kw, kb, gate)]
            o = native(*leaves[:7], cos, sin, mask, leaves[7], None, rope_k)
            grads = iter(torch.autograd.grad(o, [t for t in leaves if t is not None], dout))
            naive = [next(grads) if t is not None else None for t in leaves]
        for i, (name, got) in enumerate(zip(("dq", "dk", "dv", "dq_weight", "dq_bias", "dk_weight", "dk_bias", "dgate"),
                                            (dq, dk, dv, dqw, dqb, dkw, dkb, dg))):
            if got is None:
                continue
            # Without RoPE on k, shifting every key by the same bias leaves the softmax unchanged: the exact
            # dk_bias is 0 and both sides hold rounding noise, so measure it against dk_weight's scale.
            floor = refs[5].abs().max().item() if name == "dk_bias" and not rope_k else 0.0
            e = err(got, refs[i], floor)
            tol = max(2 * err(naive[i], refs[i], floor), torch.finfo(dt).eps) if low else 1e-5
            if not e <= tol:
                failures.append(f"bwd {name} {tag}: {e:.3g} > {tol:.3g}")

print(json.dumps({"features": C.cpu_features(), "failures": failures}))
'''


@pytest.fixture(scope="module")
def scalar_run() -> dict:
    return run_scalar_child(_CHILD)


def test_scalar_path_is_selected(scalar_run):
    assert scalar_run["features"] == "scalar"


def test_scalar_dit_attention_matches_reference(scalar_run):
    assert scalar_run["failures"] == []
