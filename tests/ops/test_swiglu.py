"""SwiGLU: every built face vs the PyTorch reference (forward, backward, poisoned outputs, bad input).
Tolerances: see op_testing.py."""

import pytest
import torch
import torch.nn.functional as F
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

from blip3o_fast.ops import swiglu, swiglu_reference

FACES = face_params("swiglu_fwd", "swiglu_bwd")
SHAPES = [(1,), (3,), (127,), (1000,), (7, 1000), (2, 3, 4099)]


def naive(gate, up):
    """The reference math run natively in the inputs' dtype: PyTorch's own low-precision error."""
    return F.silu(gate) * up


def make_inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    # gate spans silu's curved region and both tails
    gate = 4 * torch.randn(shape, generator=gen)
    up, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return [t.to(dtype).to(device) for t in (gate, up, dy)]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape):
    gate, up, dy = make_inputs(shape, dtype, face_device(face), seed=sum(shape) + len(shape))
    ga, ua = leaf(gate), leaf(up)
    out = swiglu(ga, ua, backend=face)
    dgate, dup = grads_of(out, dy, [ga, ua])

    gr, ur = leaf(gate, torch.float32), leaf(up, torch.float32)
    ref = swiglu_reference(gr, ur)
    rdgate, rdup = grads_of(ref, dy.float(), [gr, ur])
    nout = ndgate = ndup = None
    if dtype in LOW_PRECISION:
        gn, un = leaf(gate), leaf(up)
        nout = naive(gn, un)
        ndgate, ndup = grads_of(nout, dy, [gn, un])
    assert out.dtype == dgate.dtype == dup.dtype == dtype
    check_close("out", face, dtype, out, ref, nout)
    check_close("dgate", face, dtype, dgate, rdgate, ndgate)
    check_close("dup", face, dtype, dup, rdup, ndup)


@pytest.mark.parametrize("face", FACES)
def test_non_contiguous(face):
    gate, up, _ = make_inputs((64, 48), torch.float32, face_device(face), seed=1)
    out = swiglu(gate.t(), up.t(), backend=face)
    check_close("out", face, torch.float32, out, swiglu_reference(gate.t(), up.t()))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs: NaN-filled buffers come back clean."""
    n = 1000
    gate, up, dy = make_inputs((n,), dtype, face_device(face), seed=2)
    out = poison(n, dtype=dtype, device=gate.device)
    kernel_fn("swiglu_fwd", face)(gate, up, out)
    assert not out.isnan().any()
    check_close("out", face, dtype, out, swiglu_reference(gate.float(), up.float()))
    dgate, dup = poison(n, dtype=dtype, device=gate.device), poison(n, dtype=dtype, device=gate.device)
    kernel_fn("swiglu_bwd", face)(dy, gate, up, dgate, dup)
    assert not dgate.isnan().any() and not dup.isnan().any()


def test_bad_input():
    gate = torch.randn(4, 8)
    with pytest.raises(TypeError, match="gate"):
        swiglu(gate.to(torch.int32), gate)
    with pytest.raises(TypeError, match="up"):
        swiglu(gate, gate.to(torch.bfloat16))
    with pytest.raises(ValueError, match="up"):
        swiglu(gate, torch.randn(4, 9))
    with pytest.raises(ValueError, match="up"):
        swiglu(gate, torch.randn(4, 8, device="meta"))


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    gate, up, dy = make_inputs((3, 16), torch.float32, face_device(face), seed=3)
    torch.library.opcheck(torch.ops.blip3o_fast.swiglu_fwd.default, (gate.requires_grad_(), up, face))
    torch.library.opcheck(torch.ops.blip3o_fast.swiglu_bwd.default, (dy, gate.detach(), up, face))
