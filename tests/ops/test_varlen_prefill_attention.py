"""Varlen causal prefill attention: every built face vs the PyTorch reference on ragged packed prompts
(empty, one-token and long-ish sequences), GQA 1/2/7, head dims 64 and 128, a custom scale, poisoned
outputs, the C++ scalar path, and bad input. The reference itself is checked against SDPA.
Tolerances: see op_testing.py."""

import pytest
import torch
import torch.nn.functional as F
from op_testing import DTYPES, LOW_PRECISION, check_close, face_device, face_params, kernel_fn, poison, run_scalar_child

from blip3o_fast.ops import available_backends, varlen_prefill_attention, varlen_prefill_attention_reference

FACES = face_params("varlen_prefill_attention_fwd")
LENGTHS = (0, 1, 5, 150, 17, 0, 33)  # empty, single-token and a long-ish prompt among ordinary ones
GQA = pytest.mark.parametrize("heads", [(2, 2), (4, 2), (7, 1)], ids=["gqa1", "gqa2", "gqa7"])


def cu_of(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_inputs(lengths, h, kvh, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, d, generator=gen).to(device, dtype) for heads in (h, kvh, kvh))
    return q, k, v, cu_of(lengths, device)


def naive(q, k, v, cu, scale):
    """The reference math run natively in q's dtype: PyTorch's own low-precision error."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].repeat_interleave(g, 1).transpose(0, 1) for x, g in ((q, 1), (k, group), (v, group)))
        s = (qs @ ks.transpose(-1, -2) * scale).masked_fill(
            ~torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1)
    return out


def run_and_check(face, dtype, lengths, h, kvh, d, scale=None, seed=0):
    q, k, v, cu = make_inputs(lengths, h, kvh, d, dtype, face_device(face), seed)
    out = varlen_prefill_attention(q, k, v, cu, max(lengths, default=0), scale=scale, backend=face)
    ref = varlen_prefill_attention_reference(q, k, v, cu, scale)
    nout = naive(q, k, v, cu, scale if scale is not None else d**-0.5) if dtype in LOW_PRECISION else None
    assert out.dtype == dtype and out.shape == q.shape
    check_close("out", face, dtype, out, ref, nout)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@GQA
def test_matches_reference(face, dtype, heads):
    run_and_check(face, dtype, LENGTHS, *heads, 64)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_128(face, dtype):
    run_and_check(face, dtype, (3, 70, 0, 2), 4, 2, 128, seed=1)


@pytest.mark.parametrize("face", FACES)
def test_custom_scale_and_single_sequence(face):
    run_and_check(face, torch.float32, (40,), 2, 1, 64, scale=0.3, seed=2)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_output(face, dtype):
    """The kernel writes every row of its output: a NaN-filled buffer comes back clean."""
    q, k, v, cu = make_inputs((6, 0, 19), 4, 2, 64, dtype, face_device(face), seed=3)
    out = poison(*q.shape, dtype=dtype, device=q.device)
    kernel_fn("varlen_prefill_attention_fwd", face)(q, k, v, cu, 19, 0.125, out)
    assert not out.isnan().any()
    check_close("out", face, dtype, out, varlen_prefill_attention_reference(q.float(), k.float(), v.float(), cu, 0.125))


@pytest.mark.parametrize("face", FACES)
def test_no_tokens(face):
    q, k, v, cu = make_inputs((0, 0), 2, 1, 64, torch.float32, face_device(face), seed=4)
    assert varlen_prefill_attention(q, k, v, cu, 0, backend=face).shape == (0, 2, 64)


def test_reference_matches_sdpa():
    """The oracle against PyTorch's causal SDPA, one sequence at a time."""
    q, k, v, cu = make_inputs((1, 9, 30), 6, 2, 32, torch.float32, "cpu", seed=5)
    ref = varlen_prefill_attention_reference(q, k, v, cu)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        want = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                                              enable_gqa=True)[0].transpose(0, 1)
        check_close("reference", "torch", torch.float32, ref[a:b], want)


def test_bad_input():
    q, k, v, cu = make_inputs((3, 5), 4, 2, 16, torch.float32, "cpu", seed=6)
    op = varlen_prefill_attention
    with pytest.raises(TypeError, match="q"):
        op(q.to(torch.int64), k, v, cu, 5)
    with pytest.raises(TypeError, match="k"):
        op(q, k.to(torch.float16), v, cu, 5)
    with pytest.raises(ValueError, match="q"):
        op(q[None], k, v, cu, 5)
    with pytest.raises(ValueError, match="k"):
        op(q, k[:7], v, cu, 5)
    with pytest.raises(ValueError, match="v"):
        op(q, k, v[:, :1], cu, 5)
    with pytest.raises(ValueError, match="multiple"):
        op(q[:, :3], k, v, cu, 5)
    with pytest.raises(TypeError, match="cu_seqlens"):
        op(q, k, v, cu.long(), 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q, k, v, cu[None], 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q, k, v, torch.tensor([0, 3, 8], dtype=torch.int32, device="meta"), 5)
    with pytest.raises(ValueError, match="start at 0"):
        op(q, k, v, torch.tensor([1, 3, 8], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="end at N"):
        op(q, k, v, torch.tensor([0, 3, 9], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match="nondecreasing"):
        op(q, k, v, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        op(q, k, v, cu, 4)
    with pytest.raises(TypeError, match="max_seqlen"):
        op(q, k, v, cu, 5.0)


def test_kernel_checks_offsets():
    """The C++ entry point refuses offsets that would read outside q (the Python checks bypassed)."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu face is not built")
    q, k, v, _ = make_inputs((3, 5), 2, 1, 16, torch.float32, "cpu", seed=7)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernel_fn("varlen_prefill_attention_fwd", "cpu")(
            q, k, v, torch.tensor([0, 3, 99], dtype=torch.int32), 99, 0.25, torch.empty_like(q))


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    q, k, v, cu = make_inputs((2, 3), 2, 1, 16, torch.float32, face_device(face), seed=8)
    torch.library.opcheck(torch.ops.blip3o_fast.varlen_prefill_attention.default, (q, k, v, cu, 3, 0.25, face),
                          test_utils=("test_schema", "test_faketensor"))


_CHILD = r'''
import json
import torch
import blip3o_fast._C as C
from blip3o_fast.ops import varlen_prefill_attention_reference as ref

torch.manual_seed(0)
failures = []
for dt in (torch.float32, torch.bfloat16):
    for lengths, h, kvh, d in (((0, 1, 37, 5), 7, 1, 64), ((20, 3), 4, 2, 24)):
        n = sum(lengths)
        q, k, v = (torch.randn(n, x, d).to(dt) for x in (h, kvh, kvh))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out = torch.full_like(q, float("nan"))
        C.varlen_prefill_attention_fwd(q, k, v, cu, max(lengths), d ** -0.5, out)
        want = ref(q.float(), k.float(), v.float(), cu)
        err = ((out.float() - want).abs().max() / want.abs().max()).item()
        bound = 1e-5 if dt == torch.float32 else 2 * torch.finfo(dt).eps  # one rounding of the fp32 result
        if not err <= bound:
            failures.append(f"{dt} {lengths} gqa{h // kvh} d{d}: error {err:.3g} > {bound:.3g}")
print(json.dumps(failures))
'''


def test_cpu_scalar_path():
    """The kernel's scalar micro-kernels (CPUs without AVX2/FMA), forced with BLIP3O_FAST_CPU_SCALAR=1."""
    assert run_scalar_child(_CHILD) == []
