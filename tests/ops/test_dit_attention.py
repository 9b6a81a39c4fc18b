"""Fused DiT attention: every built face vs the PyTorch reference: forward (out, lse) and backward (every
gradient vs autograd through the reference) for self-attention, cross-attention (inference: hoisted
k LayerNorm; training: k LayerNorm inside), GQA, masked keys with a fully masked batch, odd lengths,
head dims 16 and 64; poisoned outputs, deterministic parameter gradients, bad input, opcheck.
The "torch" face is the custom op's own fallback (reference lse and autograd backward).
Tolerances: see op_testing.py."""

import math

import op_testing
import pytest
import torch
from op_testing import (
    DTYPES,
    LOW_PRECISION,
    check_close,
    face_params,
    kernel_fn,
    leaf,
    poison,
)

from blip3o_fast.ops import dit_attention, dit_attention_reference
from blip3o_fast.ops.dit_attention import LN_EPS

FACES = [pytest.param("torch", id="torch")] + face_params("dit_attention_fwd", "dit_attention_bwd")
KERNEL_FACES = face_params("dit_attention_fwd", "dit_attention_bwd")
OP = torch.ops.blip3o_fast.dit_attention_fwd.default

# name -> (B, Tq, Tk, Hq, Hkv, D, rope_k, k LayerNorm, gate + residual, key_mask)
CASES = {
    "self_gqa": (2, 33, 33, 4, 2, 16, True, True, False, False),
    "self_d64": (1, 7, 7, 2, 2, 64, True, True, False, False),
    "self_masked": (2, 7, 7, 2, 1, 16, True, True, True, True),
    "cross_infer": (2, 7, 33, 4, 2, 16, False, False, True, True),
    "cross_train": (2, 33, 7, 2, 2, 64, False, True, True, True),
}


def face_device(face: str) -> torch.device:
    """op_testing's, plus the torch face (the op's fallback), which runs here on CPU tensors."""
    return torch.device("cpu") if face == "torch" else op_testing.face_device(face)


NAMES = ("q", "k", "v", "q_weight", "q_bias", "k_weight", "k_bias", "gate", "residual")


def make_inputs(case, dtype, device, seed):
    """dict of the op's inputs: tensors in dtype (cos/sin fp32, batch-expanded), the last batch's keys
    all masked when the case has a mask (its queries see no key: o = 0, lse = -inf)."""
    b, tq, tk, hq, hkv, d, rope_k, k_norm, gated, masked = case
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {"q": r(b, tq, hq, d), "k": r(b, tk, hkv, d), "v": r(b, tk, hkv, d),
         "q_weight": 1 + 0.3 * r(hq * d), "q_bias": 0.3 * r(hq * d)}
    x["k_weight"], x["k_bias"] = (1 + 0.3 * r(hkv * d), 0.3 * r(hkv * d)) if k_norm else (None, None)
    x["gate"], x["residual"] = (r(hq), r(b, tq, hq, d)) if gated else (None, None)
    x = {n: None if t is None else t.to(dtype).to(device) for n, t in x.items()}
    angles = 10 * torch.rand(1, tq, d // 2, generator=gen)
    x["cos"], x["sin"] = (f(angles).expand(b, -1, -1).contiguous().to(device) for f in (torch.cos, torch.sin))
    key_mask = None
    if masked:
        key_mask = torch.rand(b, tk, generator=gen) > 0.3
        key_mask[:, 0] = True
        key_mask[-1] = False
        key_mask = key_mask.to(device)
    x["key_mask"], x["rope_k"] = key_mask, rope_k
    dy = r(b, tq, hq, d).to(dtype).to(device)
    return x, dy


def call(fn, x, leaves):
    a = {**x, **leaves}
    return fn(a["q"], a["k"], a["v"], a["q_weight"], a["q_bias"], a["k_weight"], a["k_bias"], a["cos"], a["sin"],
              key_mask=a["key_mask"], gate=a["gate"], residual=a["residual"], rope_k=a["rope_k"])


def naive(q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin, *, key_mask, gate, residual, rope_k):
    """The reference math run natively in q's dtype: PyTorch's own low-precision error. Returns (out, lse)."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]

    def ln(x, w, bias):
        n = x.shape[2] * d
        return torch.nn.functional.layer_norm(x.reshape(b, x.shape[1], n), (n,), w, bias, LN_EPS).view(x.shape)

    def rope(x):
        c, s = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]
        a, bb = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - bb * s, a * s + bb * c), dim=-1).flatten(-2)

    qn = rope(ln(q, q_weight, q_bias))
    kn = ln(k, k_weight, k_bias) if k_weight is not None else k
    kn = rope(kn) if rope_k else kn
    kh = kn.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    scores = qn.transpose(1, 2) @ kh.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    o = (torch.softmax(scores, dim=-1).nan_to_num(0.0) @ vh).transpose(1, 2)
    if gate is not None:
        o = o * gate.tanh().view(1, 1, hq, 1)
    if residual is not None:
        o = o + residual
    return o, torch.logsumexp(scores.float(), dim=-1).to(q.dtype)


def check_lse(face, dtype, lse, ref, nlse):
    dead = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), dead), f"lse [{face}, {dtype}]: -inf pattern differs"
    live = ~dead
    check_close("lse", face, dtype, lse[live], ref[live], None if nlse is None else nlse[live])


def run_and_check(face, dtype, name, seed=0):
    case = CASES[name]
    x, dy = make_inputs(case, dtype, face_device(face), seed=seed + 101 * len(name))
    given = [n for n in NAMES if x[n] is not None]

    leaves = {n: leaf(x[n]) for n in given}
    out, _, lse = call(lambda *a, **kw: OP(*a[:9], kw["key_mask"], kw["gate"], kw["residual"], kw["rope_k"], face),
                       x, leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in given], dy)

    ref_leaves = {n: leaf(x[n], torch.float32) for n in given}
    ref = call(dit_attention_reference, x, ref_leaves)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in given], dy.float())
    f32 = {n: ref_leaves[n].detach() for n in given}
    _, ref_lse = call(naive, x, f32)

    nout = nlse = None
    ngrads = [None] * len(given)
    if dtype in LOW_PRECISION:
        n_leaves = {n: leaf(x[n]) for n in given}
        nout, nlse = call(naive, x, n_leaves)
        ngrads = torch.autograd.grad(nout, [n_leaves[n] for n in given], dy)

    assert out.dtype == dtype and lse.dtype == torch.float32
    check_close("out", face, dtype, out, ref, nout)
    check_lse(face, dtype, lse, ref_lse, nlse)
    # Without RoPE on k, softmax's shift invariance makes d/dk_bias vanish in exact math: measure it
    # against the size of the per-key gradients it sums, not its roundoff-sized value.
    floors = {"k_bias": ref_grads[given.index("k")].abs().max().item()}
    for n, g, rg, ng in zip(given, grads, ref_grads, ngrads):
        assert g.dtype == x[n].dtype, f"d{n} has dtype {g.dtype}"
        check_close(f"d{n}", face, dtype, g, rg, ng, floor=floors.get(n, 0.0))
    if case[-1]:  # the fully masked batch: o = 0, out = residual
        check_close("masked out", face, dtype, out[-1], x["residual"][-1].float())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(face, dtype, name):
    run_and_check(face, dtype, name)


@pytest.mark.parametrize("face", FACES)
def test_public_wrapper(face):
    """The public op: cos/sin of batch 1 are expanded; a differentiable result equal to the reference."""
    x, dy = make_inputs(CASES["cross_train"], torch.float32, face_device(face), seed=9)
    x["cos"], x["sin"] = x["cos"][:1], x["sin"][:1]
    q = leaf(x["q"])
    out = call(lambda *a, **kw: dit_attention(*a, **kw, backend=face), x, {"q": q})
    ref = call(dit_attention_reference, {**x, "cos": x["cos"].expand(2, -1, -1), "sin": x["sin"].expand(2, -1, -1)},
               {})
    check_close("out", face, torch.float32, out, ref)
    (dq,) = torch.autograd.grad(out, [q], dy)
    assert dq.shape == q.shape and torch.isfinite(dq).all()


@pytest.mark.parametrize("face", KERNEL_FACES)
def test_param_grads_deterministic(face):
    x, dy = make_inputs(CASES["self_gqa"], torch.float32, face_device(face), seed=3)
    params = ("q_weight", "q_bias", "k_weight", "k_bias")
    runs = []
    for _ in range(2):
        leaves = {n: leaf(x[n]) for n in params}
        out = call(lambda *a, **kw: dit_attention(*a, **kw, backend=face), x, leaves)
        runs.append(torch.autograd.grad(out, [leaves[n] for n in params], dy))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("face", KERNEL_FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean (lse is
    -inf, not NaN, for the fully masked batch)."""
    dev = face_device(face)
    b, tq, tk, hq, hkv, d = CASES["cross_train"][:6]
    x, dy = make_inputs(CASES["cross_train"], dtype, dev, seed=5)
    args = [x[n] for n in ("q", "k", "v", "q_weight", "q_bias", "k_weight", "k_bias", "cos", "sin", "key_mask",
                           "gate", "residual", "rope_k")]
    out, o = poison(b, tq, hq, d, dtype=dtype, device=dev), poison(b, tq, hq, d, dtype=dtype, device=dev)
    lse = poison(b, hq, tq, device=dev)
    kernel_fn("dit_attention_fwd", face)(*args, out, lse, o)
    assert not out.isnan().any() and not o.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[-1]).all() and torch.isfinite(lse[:-1]).all()
    ref = call(dit_attention_reference, {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                             else t) for n, t in x.items()}, {})
    check_close("out", face, dtype, out, ref)

    grads = [poison(*t.shape, dtype=dtype, device=dev) for t in (x["q"], x["k"], x["v"])]
    grads += [poison(*x[n].shape, device=dev) for n in ("q_weight", "q_bias", "k_weight", "k_bias", "gate")]
    kernel_fn("dit_attention_bwd", face)(dy, *args[:11], args[12], o, lse, *grads)
    for n, g in zip(("dq", "dk", "dv", "dq_weight", "dq_bias", "dk_weight", "dk_bias", "dgate"), grads):
        assert not g.isnan().any(), f"{n} has NaN left"


def test_bad_input():
    x, _ = make_inputs(CASES["cross_infer"], torch.float32, "cpu", seed=1)
    base = dict(x)

    def run(**changes):
        call(dit_attention, {**base, **changes}, {})

    with pytest.raises(TypeError, match="q"):
        run(q=x["q"].to(torch.int32))
    with pytest.raises(TypeError, match="k has dtype"):
        run(k=x["k"].half())
    with pytest.raises(ValueError, match="v is on meta"):
        run(v=x["v"].to("meta"))
    with pytest.raises(ValueError, match="q must be 4-D"):
        run(q=x["q"][0])
    with pytest.raises(ValueError, match="v must have shape"):
        run(v=x["v"][:, :5])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        run(k=x["k"][:, :, :1].expand(-1, -1, 3, -1), v=x["v"][:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="q_weight"):
        run(q_weight=x["q_weight"][:-1])
    with pytest.raises(ValueError, match="k_weight and k_bias"):
        run(k_weight=torch.ones(x["k"].shape[2] * x["k"].shape[3]))
    with pytest.raises(ValueError, match="Tk .* must equal Tq"):
        run(rope_k=True)
    with pytest.raises(ValueError, match="cos must have shape"):
        run(cos=x["cos"][:, :3])
    with pytest.raises(TypeError, match="sin is required"):
        run(sin=None)
    with pytest.raises(TypeError, match="key_mask must be a bool"):
        run(key_mask=x["key_mask"].float())
    with pytest.raises(ValueError, match="key_mask must have shape"):
        run(key_mask=x["key_mask"][:, :3])
    with pytest.raises(ValueError, match="gate must have shape"):
        run(gate=x["gate"][:1])
    with pytest.raises(ValueError, match="residual must have shape"):
        run(residual=x["residual"][:, :1])
    with pytest.raises(ValueError, match="backend must be one of"):
        dit_attention(*(x[n] for n in ("q", "k", "v", "q_weight", "q_bias")), cos=x["cos"], sin=x["sin"],
                      rope_k=False, backend="gpu")


@pytest.mark.parametrize("face", KERNEL_FACES)
def test_triton_head_dim_error(face):
    if face != "triton":
        pytest.skip("the head-dim limit is the Triton face's")
    x, _ = make_inputs((1, 4, 4, 2, 2, 12, True, True, False, False), torch.float32, face_device(face), seed=2)
    with pytest.raises(ValueError, match="power of two"):
        call(lambda *a, **kw: dit_attention(*a, **kw, backend="triton"), x, {})


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x, _ = make_inputs((1, 5, 5, 2, 1, 16, True, True, True, True), torch.float32, face_device(face), seed=7)
    x["key_mask"][-1] = True  # opcheck's gradient comparison wants finite outputs everywhere
    args = [x[n] for n in ("q", "k", "v", "q_weight", "q_bias", "k_weight", "k_bias", "cos", "sin", "key_mask",
                           "gate", "residual", "rope_k")]
    for i in (0, 1, 2, 3, 10):
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(OP, (*args, face))
