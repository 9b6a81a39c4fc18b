"""Small-M linear (decode steps): every built face vs the PyTorch reference for M in {1, 3, 16, 33, 70}, K 896
and 100 / 900 (a K % 8 tail), N 7 / 515 / 1003 (partial tiles), with and without bias, split-K (Triton),
K chunks and M blocks (CPU, M = 70), leading dims, empty shapes, poisoned outputs, bad input, opcheck, the
scalar CPU path. Tolerances: see op_testing.py."""

import pytest
import torch
import torch.nn.functional as F
from op_testing import DTYPES, LOW_PRECISION, check_close, face_device, face_params, kernel_fn, poison, run_scalar_child

from blip3o_fast.ops import decode_linear, decode_linear_reference

FACES = face_params("decode_linear")
BOUND_FACES = [f for f in FACES if f.values[0] != "triton"]  # the faces behind a nanobind binding
OP = torch.ops.blip3o_fast.decode_linear.default

# (M, N, K): each M with K 896 and an odd K (100, 900); N 7 (one partial tile), 515 and 1003. N 7 with K 896
# or 900 takes the Triton face's split-K (GEMV and dot); M 70 is two M blocks of the CPU face, K 900 two
# of its K chunks.
CASES = [(1, 1003, 896), (1, 7, 100), (1, 7, 900), (3, 515, 896), (3, 1003, 100), (16, 1003, 896), (16, 7, 100),
         (33, 7, 896), (33, 515, 100), (70, 7, 900)]


def make_inputs(m, n, k, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen)
    return [t.to(dtype).to(device) for t in (x, w, b)]


def reference(x, w, b):
    return decode_linear_reference(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(face, dtype, case):
    m, n, k = case
    x, w, b = make_inputs(m, n, k, dtype, face_device(face), seed=m * 7 + n + k)
    for bias in (b, None):
        out = decode_linear(x, w, bias, backend=face)
        assert out.dtype == dtype and out.shape == (m, n)
        naive = F.linear(x, w, bias) if dtype in LOW_PRECISION else None  # PyTorch's own rounding
        check_close("y", face, dtype, out, reference(x, w, bias), naive)


@pytest.mark.parametrize("face", FACES)
def test_leading_dims_and_empty(face):
    dev = face_device(face)
    x, w, b = make_inputs(6, 9, 40, torch.float32, dev, seed=3)
    out = decode_linear(x.view(2, 3, 40), w, b, backend=face)
    assert out.shape == (2, 3, 9)
    check_close("y", face, torch.float32, out, reference(x, w, b).view(2, 3, 9))
    x1 = x[0]  # a single row without a batch dim
    check_close("y", face, torch.float32, decode_linear(x1, w, b, backend=face), reference(x1[None], w, b)[0])
    xt = x.view(3, 2, 40).transpose(0, 1)  # non-contiguous x is copied (it is small)
    check_close("y", face, torch.float32, decode_linear(xt, w, b, backend=face), reference(xt.reshape(6, 40), w, b)
                .view(2, 3, 9))
    assert decode_linear(x[:0], w, b, backend=face).shape == (0, 9)
    empty_k = decode_linear(x[:, :0], w[:, :0], b, backend=face)  # K == 0: the bias alone
    assert torch.equal(empty_k, b.expand(6, 9))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 1003, 100), (16, 7, 896), (33, 515, 896)], ids=str)
def test_poisoned_outputs(face, dtype, case):
    """The kernels write every element of out (and ignore what it held)."""
    m, n, k = case
    dev = face_device(face)
    x, w, b = make_inputs(m, n, k, dtype, dev, seed=5)
    for bias in (b, None):
        out = poison(m, n, dtype=dtype, device=dev)
        kernel_fn("decode_linear", face)(x, w, bias, out)
        assert not out.isnan().any()
        check_close("y", face, dtype, out, reference(x, w, bias), F.linear(x, w, bias) if dtype != torch.float32
                    else None)


def test_bad_input():
    x, w, b = make_inputs(3, 5, 8, torch.float32, "cpu", seed=1)
    with pytest.raises(TypeError, match="x must be float32"):
        decode_linear(x.int(), w, b)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        decode_linear(x, w.half(), b)
    with pytest.raises(TypeError, match="bias has dtype"):
        decode_linear(x, w, b.bfloat16())
    with pytest.raises(ValueError, match="weight is on meta"):
        decode_linear(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        decode_linear(x, w[0], b)
    with pytest.raises(ValueError, match=r"x's last dim \(8\) must equal weight's K"):
        decode_linear(x, w[:, :4].contiguous(), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        decode_linear(x, w, b[:4])
    with pytest.raises(ValueError, match="weight must be contiguous"):
        decode_linear(x, torch.randn(8, 5).T, b)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        decode_linear(x[0, 0], w, b)
    with pytest.raises(RuntimeError, match="inference only"):
        decode_linear(x, w.clone().requires_grad_(), b)
    with torch.no_grad():  # inference mode: inputs that require grad are fine
        check_close("y", "cpu", torch.float32, decode_linear(x, w.clone().requires_grad_(), b), reference(x, w, b))
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_linear(x, w, b, backend="gpu")


@pytest.mark.parametrize("face", BOUND_FACES)
def test_kernel_rejects_bad_arguments(face):
    """The bindings check the contract too: a direct kernel call gets a clear error, never a copy."""
    x, w, b = make_inputs(3, 5, 8, torch.float32, face_device(face), seed=1)
    fn = kernel_fn("decode_linear", face)
    with pytest.raises(TypeError, match="out must be float32, got bfloat16"):
        fn(x, w, b, torch.empty(3, 5, dtype=torch.bfloat16, device=x.device))
    with pytest.raises(ValueError, match=r"weight must have shape \(5, 8\), got \(5, 4\)"):
        fn(x, w[:, :4].contiguous(), b, torch.empty(3, 5, device=x.device))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 5\)"):
        fn(x, w, b, torch.empty(3, 4, device=x.device))
    with pytest.raises(TypeError):  # a transposed (non-contiguous) weight is refused, not copied
        fn(x, torch.randn(8, 5, device=x.device).T, b, torch.empty(3, 5, device=x.device))


@pytest.mark.parametrize("face", [pytest.param("torch", id="torch")] + FACES)
def test_opcheck(face):
    dev = torch.device("cpu") if face == "torch" else face_device(face)
    x, w, b = make_inputs(3, 20, 24, torch.float32, dev, seed=7)
    torch.library.opcheck(OP, (x, w, b, face))
    torch.library.opcheck(OP, (x, w, None, face))


_SCALAR_CHILD = r'''
import json, torch
from blip3o_fast.ops import decode_linear, decode_linear_reference
errs = {}
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for m, n, k in ((1, 7, 100), (5, 37, 896)):
        x, w, b = torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt), torch.randn(n).to(dt)
        ref = decode_linear_reference(x.float(), w.float(), b.float())
        out = decode_linear(x, w, b, backend="cpu")
        errs[f"{dt} {m}x{n}x{k}"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(errs))
'''


def test_cpu_scalar_path():
    """BLIP3O_FAST_CPU_SCALAR=1 (read once per process) takes the scalar tiles."""
    errs = run_scalar_child(_SCALAR_CHILD)
    for key, err in errs.items():
        tol = 1e-5 if "float32" in key else 1e-2  # 16-bit: one rounding of the output (2^-8)
        assert err <= tol, f"scalar path {key}: error {err:.3g} > {tol}"
