"""Fused linear + cross-entropy: every built face vs the materialising PyTorch reference (loss and the
gradients of hidden and weight, every reduction, ignored rows, a vocabulary that is no multiple of any
tile, a frozen weight, poisoned outputs, bad input, the scalar CPU path). Tolerances: see op_testing.py."""

import pytest
import torch
import torch.nn.functional as F
from op_testing import (
    LOW_PRECISION,
    check_close,
    face_device,
    face_params,
    kernel_fn,
    leaf,
    poison,
    run_scalar_child,
)

from blip3o_fast.ops import available_backends, linear_cross_entropy, linear_cross_entropy_reference

FACES = face_params("linear_cross_entropy_fwd", "linear_cross_entropy_bwd")
IGNORE = -100
# (leading dims of hidden, H, V): one row; 1000 + 7 vocab (no tile divides it) with a ragged H; two CPU
# row tiles (128 rows) with batch and time dims.
SHAPES = [((1,), 1, 1), ((37,), 24, 1007), ((2, 65), 40, 100)]


def make_inputs(lead, h, v, dtype, device, seed, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / max(h, 1) ** 0.5)  # logits of order 2: a peaked softmax
    targets = torch.randint(0, v, lead, generator=gen)
    flat = targets.view(-1)
    flat[1::ignore_every] = IGNORE
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


def naive(hidden, weight, targets, reduction):
    """The reference math run natively in hidden's dtype: PyTorch's own low-precision error."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    rows = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE, reduction="none").float()
    if reduction == "none":
        return rows.view(targets.shape)
    total = rows.sum()
    return total / (targets != IGNORE).sum().clamp(min=1) if reduction == "mean" else total


def loss_and_grads(fn, hidden, weight, targets, reduction, dy, dtype=None):
    h, w = leaf(hidden, dtype), leaf(weight, dtype)
    loss = fn(h, w, targets, reduction)
    gh, gw = torch.autograd.grad(loss, (h, w), dy)
    return loss, gh, gw


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(face, dtype, shape, reduction):
    lead, h, v = shape
    hidden, weight, targets = make_inputs(lead, h, v, dtype, face_device(face), seed=h * 31 + v)
    dy = torch.randn(targets.shape if reduction == "none" else (), generator=torch.Generator().manual_seed(1))
    dy = dy.to(hidden.device)

    def fused(a, b, t, red):
        return linear_cross_entropy(a, b, t, ignore_index=IGNORE, reduction=red, backend=face)

    def reference(a, b, t, red):
        return linear_cross_entropy_reference(a, b, t, ignore_index=IGNORE, reduction=red)

    out = loss_and_grads(fused, hidden, weight, targets, reduction, dy)
    ref = loss_and_grads(reference, hidden, weight, targets, reduction, dy, torch.float32)
    nv = [None] * 3
    if dtype in LOW_PRECISION:
        nv = loss_and_grads(naive, hidden, weight, targets, reduction, dy.to(dtype) if reduction != "none" else dy)
    assert out[0].dtype == torch.float32 and out[0].shape == ref[0].shape
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for name, got, want, low in zip(("loss", "dhidden", "dweight"), out, ref, nv):
        check_close(name, face, dtype, got, want, low)


@pytest.mark.parametrize("face", FACES)
def test_float16(face):
    hidden, weight, targets = make_inputs((37,), 24, 1007, torch.float16, face_device(face), seed=3)
    dy = torch.tensor(0.7, device=hidden.device)
    out = loss_and_grads(lambda a, b, t, r: linear_cross_entropy(a, b, t, reduction=r, backend=face),
                         hidden, weight, targets, "sum", dy)
    ref = loss_and_grads(lambda a, b, t, r: linear_cross_entropy_reference(a, b, t, reduction=r),
                         hidden, weight, targets, "sum", dy, torch.float32)
    nv = loss_and_grads(naive, hidden, weight, targets, "sum", dy.half())
    for name, got, want, low in zip(("loss", "dhidden", "dweight"), out, ref, nv):
        check_close(name, face, torch.float16, got, want, low)


@pytest.mark.parametrize("face", FACES)
def test_ignored_rows(face):
    """Every row ignored: loss 0 (mean without NaN), zero gradients; one live row: only it counts."""
    dev = face_device(face)
    hidden, weight, _ = make_inputs((6,), 16, 50, torch.float32, dev, seed=2)
    targets = torch.full((6,), IGNORE, device=dev)
    for reduction in ("mean", "sum", "none"):
        h, w = leaf(hidden), leaf(weight)
        loss = linear_cross_entropy(h, w, targets, ignore_index=IGNORE, reduction=reduction, backend=face)
        assert not loss.isnan().any() and (loss == 0).all()
        loss.sum().backward()
        assert (h.grad == 0).all() and (w.grad == 0).all()
    targets[3] = 7
    h, w = leaf(hidden), leaf(weight)
    loss = linear_cross_entropy(h, w, targets, ignore_index=IGNORE, backend=face)
    want = F.cross_entropy(hidden[3:4] @ weight.T, targets[3:4])
    check_close("loss", face, torch.float32, loss, want)
    loss.backward()
    assert (h.grad[:3] == 0).all() and (h.grad[4:] == 0).all() and h.grad[3].abs().max() > 0


@pytest.mark.parametrize("face", FACES)
def test_frozen_weight(face):
    """A weight that needs no gradient (frozen lm_head) gets none, and the kernels skip dweight."""
    hidden, weight, targets = make_inputs((19,), 24, 300, torch.float32, face_device(face), seed=4)
    h = leaf(hidden)
    linear_cross_entropy(h, weight, targets, ignore_index=IGNORE, backend=face).backward()
    assert weight.grad is None
    h_ref = leaf(hidden)
    linear_cross_entropy_reference(h_ref, weight, targets, ignore_index=IGNORE).backward()
    check_close("dhidden", face, torch.float32, h.grad, h_ref.grad)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernels write every element of their outputs, and leave a gradient they are not given alone."""
    n, h, v = 21, 24, 203
    dev = face_device(face)
    hidden, weight, targets = make_inputs((n,), h, v, dtype, dev, seed=5)
    loss, lse = poison(n, device=dev), poison(n, device=dev)
    kernel_fn("linear_cross_entropy_fwd", face)(hidden, weight, targets, loss, lse, IGNORE)
    assert not loss.isnan().any() and not lse.isnan().any()
    ref_rows = linear_cross_entropy_reference(hidden.float(), weight.float(), targets, ignore_index=IGNORE,
                                              reduction="none")
    check_close("loss", face, dtype, loss, ref_rows, ref_rows.to(dtype))

    dloss = torch.rand(n, device=dev)
    bwd = kernel_fn("linear_cross_entropy_bwd", face)
    dh, dw = poison(n, h, dtype=dtype, device=dev), poison(v, h, dtype=dtype, device=dev)
    bwd(dloss, hidden, weight, targets, lse, dh, dw, IGNORE)
    assert not dh.isnan().any() and not dw.isnan().any()
    dh_only = poison(n, h, dtype=dtype, device=dev)
    bwd(dloss, hidden, weight, targets, lse, dh_only, None, IGNORE)
    assert torch.equal(dh_only, dh)
    dw_only = poison(v, h, dtype=dtype, device=dev)
    bwd(dloss, hidden, weight, targets, lse, None, dw_only, IGNORE)
    assert torch.equal(dw_only, dw)


@pytest.mark.parametrize("face", FACES)
def test_grads_deterministic(face):
    hidden, weight, targets = make_inputs((150,), 40, 333, torch.float32, face_device(face), seed=6)
    runs = []
    for _ in range(2):
        h, w = leaf(hidden), leaf(weight)
        linear_cross_entropy(h, w, targets, ignore_index=IGNORE, backend=face).backward()
        runs.append((h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_bad_input():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 9, IGNORE, 3])
    with pytest.raises(ValueError, match="target 10 is out of range for vocabulary size 10"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match="target -1 is out of range"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(TypeError, match="targets must be an int64"):
        linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="weight"):
        linear_cross_entropy(hidden, weight.half(), targets)
    with pytest.raises(TypeError, match="hidden"):
        linear_cross_entropy(hidden.long(), weight, targets)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, torch.randn(10, 7), targets)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="max")
    with pytest.raises(ValueError, match="vocabulary"):
        linear_cross_entropy(hidden, torch.randn(0, 8), torch.full((4,), IGNORE))


@pytest.mark.skipif("cpu" not in available_backends(), reason="the cpu face is not built")
def test_cpu_kernel_argument_checks():
    """The C++ entry points refuse arguments that break their contract (the binding checks them)."""
    face = "cpu"
    hidden, weight, targets = make_inputs((4,), 8, 10, torch.float32, "cpu", seed=8)
    loss, lse = torch.empty(4), torch.empty(4)
    fwd = kernel_fn("linear_cross_entropy_fwd", face)
    with pytest.raises(TypeError, match="targets must be int64"):
        fwd(hidden, weight, targets.int(), loss, lse, IGNORE)
    with pytest.raises(ValueError, match="weight must have shape"):
        fwd(hidden, weight[:, :4].contiguous(), targets, loss, lse, IGNORE)
    with pytest.raises(TypeError, match="dhidden must be bfloat16"):
        kernel_fn("linear_cross_entropy_bwd", face)(torch.ones(4), hidden.bfloat16(), weight.bfloat16(), targets,
                                                    lse, torch.empty(4, 8), None, IGNORE)


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    hidden, weight, targets = make_inputs((5,), 16, 40, torch.float32, face_device(face), seed=9)
    torch.library.opcheck(torch.ops.blip3o_fast.linear_cross_entropy_fwd.default,
                          (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE, face))
    _, lse = torch.ops.blip3o_fast.linear_cross_entropy_fwd(hidden.detach(), weight.detach(), targets, IGNORE, face)
    dloss = torch.rand(5, device=hidden.device)
    torch.library.opcheck(torch.ops.blip3o_fast.linear_cross_entropy_bwd.default,
                          (dloss, hidden.detach(), weight.detach(), targets, lse, IGNORE, True, False, face))


_SCALAR_CHILD = r'''
import json, torch
from blip3o_fast.ops import linear_cross_entropy, linear_cross_entropy_reference
errs = {}
for dt in (torch.float32, torch.bfloat16):
    for n, h, v in ((1, 1, 1), (37, 13, 1007), (130, 40, 70)):
        g = torch.Generator().manual_seed(n + h + v)
        hidden = torch.randn(n, h, generator=g).to(dt)
        weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dt)
        targets = torch.randint(0, v, (n,), generator=g)
        targets[1::4] = -100
        a = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        out = linear_cross_entropy(*a, targets, reduction="sum", backend="cpu")
        grads = torch.autograd.grad(out, a)
        r = [hidden.float().requires_grad_(), weight.float().requires_grad_()]
        ref = linear_cross_entropy_reference(*r, targets, reduction="sum")
        rgrads = torch.autograd.grad(ref, r)
        def rel(p, q):
            return ((p.float() - q).abs().max() / max(q.abs().max().item(), 1e-30)).item()
        errs[f"{dt} {(n, h, v)}"] = max([rel(out, ref)] + [rel(p, q) for p, q in zip(grads, rgrads)])
print(json.dumps(errs))
'''


def test_cpu_scalar_path():
    """BLIP3O_FAST_CPU_SCALAR=1 (read once per process) takes the scalar micro-kernels: fwd + bwd vs the reference."""
    errs = run_scalar_child(_SCALAR_CHILD)
    for key, err in errs.items():
        tol = 1e-5 if "float32" in key else 2e-2  # bf16: one gradient rounding (2^-8) plus the logits' own
        assert err <= tol, f"scalar path {key}: error {err:.3g} > {tol}"
