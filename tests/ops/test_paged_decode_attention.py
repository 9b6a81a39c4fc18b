"""Paged decode attention: every built face vs the PyTorch reference on ragged batches (lengths 0 and 1
included), block sizes 16 and 5, shuffled block tables with garbage past each sequence's blocks and
NaN in every unreferenced cache block, GQA ratios 1, 2 and 7, head dims 64 and 128; split-K (one split
vs many), poisoned outputs, bad input, the GPU faces' head-dim fallback, opcheck, the scalar CPU path.
Tolerances: see op_testing.py."""

import math

import pytest
import torch
from op_testing import DTYPES, LOW_PRECISION, check_close, face_device, face_params, kernel_fn, poison, run_scalar_child

from blip3o_fast.ops import paged_decode_attention, paged_decode_attention_reference

FACES = face_params("paged_decode_attention")
BOUND_FACES = [f for f in FACES if f.values[0] != "triton"]  # the faces behind a nanobind binding
GPU_FACES = [f for f in FACES if f.values[0] in ("triton", "cuda")]  # head dims 64 and 128 only
OP = torch.ops.blip3o_fast.paged_decode_attention.default

# name -> (H, KVH, D, block_size, seq_lens)
CASES = {
    "gqa7_bs16": (14, 2, 64, 16, [37, 1, 0]),
    "mha_bs5": (2, 2, 64, 5, [23, 9]),
    "gqa2_d128": (4, 2, 128, 16, [50, 16]),
}
GARBAGE = 10**6  # table entries past a sequence's blocks: out of range, so reading one would fault or NaN


def make_inputs(h, kvh, d, block_size, seq_lens, dtype, device, seed, extra_blocks=3):
    """q, caches, tables, lens. Each sequence's blocks are a random subset of a shuffled pool; the
    blocks no table names are NaN, the table entries past each sequence's blocks are GARBAGE."""
    gen = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    width = max(need) + 2
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((b, width), GARBAGE, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = order[used:used + n].int()
        used += n
    k = torch.randn(num_blocks, block_size, kvh, d, generator=gen)
    v = torch.randn(num_blocks, block_size, kvh, d, generator=gen)
    unused = order[used:]
    k[unused] = float("nan")
    v[unused] = float("nan")
    q = torch.randn(b, h, d, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device) for t in (q.to(dtype), k.to(dtype), v.to(dtype), tables, lens)]


def naive(q, k, v, tables, lens):
    """The math run natively in q's dtype, sequence by sequence: PyTorch's own low-precision error."""
    b, h, d = q.shape
    bs, kvh = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        keys = k.reshape(-1, kvh, d)[slots].repeat_interleave(h // kvh, dim=1)  # (n, H, D)
        vals = v.reshape(-1, kvh, d)[slots].repeat_interleave(h // kvh, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i], keys) / math.sqrt(d), dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, vals)
    return out


def reference(q, k, v, tables, lens, **kw):
    return paged_decode_attention_reference(q.float(), k.float(), v.float(), tables, lens, **kw)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(face, dtype, name):
    h, kvh, d, bs, lens = CASES[name]
    x = make_inputs(h, kvh, d, bs, lens, dtype, face_device(face), seed=len(name) * 31 + d)
    out = paged_decode_attention(*x, backend=face)
    ref = reference(*x)
    assert out.dtype == dtype and out.shape == x[0].shape
    assert torch.isfinite(out).all(), "NaN from an unreferenced block leaked"
    check_close("out", face, dtype, out, ref, naive(*x) if dtype in LOW_PRECISION else None)
    empty = torch.tensor(lens) == 0
    assert (out[empty] == 0).all(), "a sequence with no token must give zeros"


def test_reference_matches_brute_force():
    """The oracle itself vs a per-sequence, per-head loop of plain softmax attention in fp64."""
    h, kvh, d, bs, lens = CASES["gqa7_bs16"]
    q, k, v, tables, seq_lens = make_inputs(h, kvh, d, bs, lens, torch.float32, "cpu", seed=1)
    ref = paged_decode_attention_reference(q, k, v, tables, seq_lens, scale=0.3)
    for i, n in enumerate(lens):
        for head in range(h):
            if n == 0:
                assert (ref[i, head] == 0).all()
                continue
            rows = [int(tables[i, t // bs]) * bs + t % bs for t in range(n)]
            keys = k.reshape(-1, kvh, d)[rows, head // (h // kvh)].double()
            vals = v.reshape(-1, kvh, d)[rows, head // (h // kvh)].double()
            expect = torch.softmax(0.3 * keys @ q[i, head].double(), 0) @ vals
            torch.testing.assert_close(ref[i, head].double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("face", FACES)
def test_num_splits(face):
    """One split and many agree up to rounding (a split may be empty: 5 and 13 splits of 10 blocks)."""
    x = make_inputs(4, 2, 64, 16, [150, 70, 0, 1], torch.float32, face_device(face), seed=11)
    ref = reference(*x)
    one = paged_decode_attention(*x, num_splits=1, backend=face)
    check_close("out (1 split)", face, torch.float32, one, ref)
    for splits in (2, 5, 13):
        many = paged_decode_attention(*x, num_splits=splits, backend=face)
        check_close(f"out ({splits} splits)", face, torch.float32, many, one)
        assert (many[2] == 0).all()


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_poisoned_outputs(face, dtype, splits):
    """The kernels write every element of out (and of the split scratch they read back)."""
    dev = face_device(face)
    q, k, v, tables, lens = make_inputs(14, 2, 64, 16, [37, 1, 0], dtype, dev, seed=5)
    b, h, d = q.shape
    out = poison(b, h, d, dtype=dtype, device=dev)
    part_out = poison(b, h, splits, d, device=dev) if splits > 1 else None
    part_lse = poison(b, h, splits, device=dev) if splits > 1 else None
    kernel_fn("paged_decode_attention", face)(q, k, v, tables, lens, out, part_out, part_lse, d**-0.5)
    assert not out.isnan().any()
    check_close("out", face, dtype, out, reference(q, k, v, tables, lens))
    if splits > 1:
        assert torch.isneginf(part_lse[2]).all() and torch.isfinite(part_lse[:2, :, 0]).all()


@pytest.mark.parametrize("face", FACES)
def test_scale(face):
    x = make_inputs(4, 2, 64, 5, [12, 3], torch.float32, face_device(face), seed=3)
    check_close("out", face, torch.float32, paged_decode_attention(*x, scale=0.05, backend=face),
                reference(*x, scale=0.05))


def test_bad_input():
    q, k, v, tables, lens = make_inputs(4, 2, 8, 4, [5, 2], torch.float32, "cpu", seed=1)

    def run(**changes):
        a = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, seq_lens=lens)
        kw = {n: changes.pop(n) for n in ("scale", "num_splits", "backend") if n in changes}
        a.update(changes)
        return paged_decode_attention(*a.values(), **kw)

    with pytest.raises(TypeError, match="q must be float32"):
        run(q=q.to(torch.int32))
    with pytest.raises(TypeError, match="k_cache has dtype"):
        run(k_cache=k.half())
    with pytest.raises(ValueError, match="v_cache is on meta"):
        run(v_cache=v.to("meta"))
    with pytest.raises(ValueError, match="q must be 3-D"):
        run(q=q[0])
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        run(k_cache=k[0])
    with pytest.raises(ValueError, match="head dim"):
        run(q=q[..., :4].contiguous())
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        run(v_cache=v[:-1])
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        run(q=q[:, :3].contiguous())
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        run(k_cache=k.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(TypeError, match="block_tables must be int32, got torch.int64"):
        run(block_tables=tables.long())
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        run(seq_lens=lens.float())
    with pytest.raises(ValueError, match="seq_lens is on meta"):
        run(seq_lens=lens.to("meta"))
    with pytest.raises(ValueError, match="block_tables must be 2-D"):
        run(block_tables=tables[0])
    with pytest.raises(ValueError, match="for q's batch of 2"):
        run(seq_lens=lens[:1])
    with pytest.raises(ValueError, match="num_splits must be an int from 1 to 64"):
        run(num_splits=0)
    with pytest.raises(ValueError, match="num_splits"):
        run(num_splits=65)
    with pytest.raises(RuntimeError, match="inference only"):
        run(q=q.clone().requires_grad_())
    with pytest.raises(ValueError, match="backend must be one of"):
        run(backend="gpu")


@pytest.mark.parametrize("face", BOUND_FACES)
def test_kernel_rejects_bad_tables(face):
    """The bindings check the contract too: a direct kernel call gets a clear error."""
    q, k, v, tables, lens = make_inputs(4, 2, 64, 4, [5, 2], torch.float32, face_device(face), seed=1)
    out = torch.empty_like(q)
    with pytest.raises(TypeError, match="block_tables must be int32"):
        kernel_fn("paged_decode_attention", face)(q, k, v, tables.long(), lens, out, None, None, 0.1)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        kernel_fn("paged_decode_attention", face)(q[:, :3].contiguous(), k, v, tables, lens, out[:, :3].contiguous(),
                                                  None, None, 0.1)


@pytest.mark.parametrize("face", GPU_FACES)
def test_gpu_head_dim_fallback(face):
    """Head dim 32: the kernel refuses it clearly, the op runs the reference with a warning."""
    x = make_inputs(4, 2, 32, 16, [20, 3], torch.float32, face_device(face), seed=2)
    with pytest.raises((ValueError, RuntimeError), match="head dim D must be"):
        kernel_fn("paged_decode_attention", face)(*x, torch.empty_like(x[0]), None, None, 0.1)
    with pytest.warns(UserWarning, match=f"the {face} face takes head dims"):
        out = paged_decode_attention(*x, backend=face)
    check_close("out", "torch", torch.float32, out, reference(*x))


@pytest.mark.parametrize("face", [pytest.param("torch", id="torch")] + FACES)
def test_opcheck(face):
    dev = torch.device("cpu") if face == "torch" else face_device(face)  # the torch face: the op's fallback
    q, k, v, tables, lens = make_inputs(4, 2, 64, 16, [20, 3], torch.float32, dev, seed=7)
    torch.library.opcheck(OP, (q, k, v, tables, lens, 0.125, 2, face))


_SCALAR_CHILD = r'''
import json, torch
from blip3o_fast.ops import available_backends, paged_decode_attention, paged_decode_attention_reference
errs = {}
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for d in (60, 64):  # 60: the AVX2 rows' scalar tail (D % 8 != 0) in the vector build
        q = torch.randn(3, 14, d, generator=g).to(dt)
        k, v = (torch.randn(12, 5, 2, d, generator=g).to(dt) for _ in range(2))
        tables = torch.randperm(12, generator=g)[:9].view(3, 3).int()
        lens = torch.tensor([13, 1, 0], dtype=torch.int32)
        ref = paged_decode_attention_reference(q.float(), k.float(), v.float(), tables, lens)
        for splits in (1, 3):
            out = paged_decode_attention(q, k, v, tables, lens, num_splits=splits, backend="cpu")
            errs[f"{dt} D={d} splits={splits}"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(errs))
'''


def test_cpu_scalar_path():
    """BLIP3O_FAST_CPU_SCALAR=1 (read once per process) takes the scalar row bodies."""
    errs = run_scalar_child(_SCALAR_CHILD)
    for key, err in errs.items():
        tol = 1e-5 if "float32" in key else 1e-2  # bf16: one rounding of the output (2^-8)
        assert err <= tol, f"scalar path {key}: error {err:.3g} > {tol}"
