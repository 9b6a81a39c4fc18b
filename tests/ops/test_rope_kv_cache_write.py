"""RoPE + KV-cache write: every built face vs ops.apply_rope + index_copy_ (the reference, and apply_rope's
own face), with 1-D RoPE and Qwen's 3-D M-RoPE tables, padding rows (negative slots) skipped, the
untouched rest of the caches preserved, poisoned outputs, the C++ scalar path, and bad input.
Exactness: bitwise where the math is the same (the CPU faces, and the Triton interpreter except its
truncating bf16 cast); GPU faces may contract the rotation into FMAs, so they get op_testing's tolerances."""

import pytest
import torch
from op_testing import DTYPES, check_close, face_device, face_params, kernel_fn, poison, run_scalar_child

from blip3o_fast.ops import (
    apply_rope,
    dispatch,
    mrope_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    rope_kv_cache_write,
    rope_kv_cache_write_reference,
)

FACES = face_params("rope_kv_cache_write")
HEADS = pytest.mark.parametrize("heads", [(14, 2, 64), (4, 4, 128), (7, 1, 8)], ids=["14/2xD64", "4/4xD128", "7/1xD8"])
NUM_BLOCKS, BLOCK_SIZE = 5, 4


def tables(kind: str, t: int, d: int, seed: int):
    """Per-token (T, D/2) cos/sin as the models build them: 1-D positions, or 3-D M-RoPE positions."""
    gen = torch.Generator().manual_seed(seed)
    inv = rope_inv_freq(d, 1e6)
    if kind == "rope":
        cos, sin = rope_cos_sin(torch.randint(0, 4096, (1, t), generator=gen), inv)
    else:
        half = d // 2
        section = [half // 4, half // 4 + half % 4 // 2, half - 2 * (half // 4) - half % 4 // 2]
        cos, sin = mrope_cos_sin(torch.randint(0, 512, (3, 1, t), generator=gen), inv, section)
    return cos[0], sin[0]


def make_inputs(t, h, kvh, d, dtype, device, seed, kind="rope"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, x, d, generator=gen).to(device, dtype) for x in (h, kvh, kvh))
    cos, sin = tables(kind, t, d, seed)
    # random old cache contents: whatever is not written must survive
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, BLOCK_SIZE, kvh, d, generator=gen).to(device, dtype) for _ in range(2))
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:t]
    slots[1::3] = -1  # padding rows
    return q, k, v, cos.to(device), sin.to(device), k_cache, v_cache, slots.to(device)


def bitwise_expected(face: str, dtype: torch.dtype) -> bool:
    if face == "cpu":
        return True
    return face == "triton" and dispatch.triton_interpreter() and dtype != torch.bfloat16


def expect_same(name, face, dtype, got, want):
    if bitwise_expected(face, dtype):
        assert torch.equal(got, want), f"{name} [{face}, {dtype}]: not bitwise equal"
    else:
        check_close(name, face, dtype, got, want)


def run_and_check(face, dtype, t, heads, kind, seed):
    q, k, v, cos, sin, kc, vc, slots = make_inputs(t, *heads, dtype, face_device(face), seed, kind)
    kc_ref, vc_ref, kc_face, vc_face = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q_rot, k_rot = rope_kv_cache_write(q, k, v, cos, sin, kc, vc, slots, backend=face)
    q_ref, k_ref = rope_kv_cache_write_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots)
    # The spelled-out unfused path on the same face: apply_rope, then index_copy_ of the kept rows.
    keep = slots >= 0
    flat = (-1, *k.shape[1:])
    q_face = apply_rope(q[None], cos[None], sin[None], backend=face)[0]
    k_face = apply_rope(k[None], cos[None], sin[None], backend=face)[0]
    kc_face.view(flat).index_copy_(0, slots[keep], k_face[keep])
    vc_face.view(flat).index_copy_(0, slots[keep], v[keep])
    assert q_rot.dtype == dtype and q_rot.shape == q.shape and k_rot.shape == k.shape
    for name, got, want in (("q_rot", q_rot, q_ref), ("k_rot", k_rot, k_ref), ("k_cache", kc, kc_ref)):
        expect_same(name, face, dtype, got, want)
    for name, got, want in (("q_rot", q_rot, q_face), ("k_rot", k_rot, k_face), ("k_cache", kc, kc_face)):
        if face == "cpu" or dispatch.triton_interpreter():  # the same math and casts as apply_rope's face
            assert torch.equal(got, want), f"{name} [{face}, {dtype}]: differs from apply_rope + index_copy_"
        else:
            check_close(name + " vs apply_rope", face, dtype, got, want)
    assert torch.equal(vc, vc_ref), "v_cache must be an exact copy"


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rope", "mrope"])
@HEADS
def test_matches_reference(face, dtype, kind, heads):
    run_and_check(face, dtype, 7, heads, kind, seed=sum(heads))


@pytest.mark.parametrize("face", FACES)
def test_every_slot_and_one_token(face):
    """A decode step (one token) and a prefill filling the whole pool."""
    run_and_check(face, torch.float32, 1, (4, 2, 64), "rope", seed=1)
    q, k, v, cos, sin, kc, vc, _ = make_inputs(NUM_BLOCKS * BLOCK_SIZE, 2, 1, 16, torch.float32, face_device(face), 2)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=torch.Generator().manual_seed(2)).to(q.device)
    _, k_rot = rope_kv_cache_write(q, k, v, cos, sin, kc, vc, slots, backend=face)
    assert torch.equal(kc.view(-1, 1, 16)[slots], k_rot) and torch.equal(vc.view(-1, 1, 16)[slots], v)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_outputs(face, dtype):
    """The kernel writes every element of q_rot and k_rot: NaN-filled buffers come back clean."""
    q, k, v, cos, sin, kc, vc, slots = make_inputs(5, 6, 2, 64, dtype, face_device(face), seed=3)
    q_rot, k_rot = (poison(*x.shape, dtype=dtype, device=q.device) for x in (q, k))
    kernel_fn("rope_kv_cache_write", face)(q, k, v, cos, sin, kc, vc, slots, q_rot, k_rot)
    assert not q_rot.isnan().any() and not k_rot.isnan().any()
    q_ref, k_ref = rope_kv_cache_write_reference(q, k, v, cos, sin, kc.clone(), vc.clone(), slots)
    check_close("q_rot", face, dtype, q_rot, q_ref)
    check_close("k_rot", face, dtype, k_rot, k_ref)


@pytest.mark.parametrize("face", FACES)
def test_kernel_drops_slots_past_the_pool(face):
    """Called directly (no host check, as on GPUs), a slot past the pool is not written, like a negative one."""
    q, k, v, cos, sin, kc, vc, slots = make_inputs(4, 2, 2, 16, torch.float32, face_device(face), seed=4)
    slots = torch.tensor([NUM_BLOCKS * BLOCK_SIZE, -1, 10**9, -7], device=q.device)
    before = kc.clone(), vc.clone()
    kernel_fn("rope_kv_cache_write", face)(q, k, v, cos, sin, kc, vc, slots, torch.empty_like(q), torch.empty_like(k))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_bad_input():
    q, k, v, cos, sin, kc, vc, slots = make_inputs(4, 4, 2, 16, torch.float32, "cpu", seed=5)
    op = rope_kv_cache_write
    with pytest.raises(TypeError, match="q"):
        op(q.to(torch.int32), k, v, cos, sin, kc, vc, slots)
    with pytest.raises(TypeError, match="k_cache"):
        op(q, k, v, cos, sin, kc.half(), vc, slots)
    with pytest.raises(ValueError, match="q"):
        op(q[None], k, v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="even"):
        op(q[..., :15], k[..., :15], v[..., :15], cos, sin, kc[..., :15], vc[..., :15], slots)
    with pytest.raises(ValueError, match="k must"):
        op(q, k[:3], v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="v"):
        op(q, k, v[:, :1], cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="cos"):
        op(q, k, v, cos[None], sin, kc, vc, slots)
    with pytest.raises(ValueError, match="sin"):
        op(q, k, v, cos, sin.to("meta"), kc, vc, slots)
    with pytest.raises(ValueError, match="k_cache"):
        op(q, k, v, cos, sin, kc[..., :1, :], vc, slots)
    with pytest.raises(ValueError, match="v_cache"):
        op(q, k, v, cos, sin, kc, vc[:2], slots)
    with pytest.raises(ValueError, match="contiguous"):
        op(q, k, v, cos, sin, kc, vc.transpose(0, 1).contiguous().transpose(0, 1), slots)
    with pytest.raises(TypeError, match="slots"):
        op(q, k, v, cos, sin, kc, vc, slots.int())
    with pytest.raises(ValueError, match="slots"):
        op(q, k, v, cos, sin, kc, vc, slots[:3])
    with pytest.raises(ValueError, match="past the cache"):
        op(q, k, v, cos, sin, kc, vc, torch.tensor([0, 1, 2, NUM_BLOCKS * BLOCK_SIZE]))


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    q, k, v, cos, sin, kc, vc, slots = make_inputs(3, 2, 1, 16, torch.float32, face_device(face), seed=6)
    torch.library.opcheck(torch.ops.blip3o_fast.rope_kv_cache_write.default, (q, k, v, cos, sin, kc, vc, slots, face),
                          test_utils=("test_schema", "test_faketensor"))


_CHILD = r'''
import json
import torch
import blip3o_fast._C as C
from blip3o_fast.ops import rope_kv_cache_write_reference as ref

torch.manual_seed(0)
failures = []
for dt in (torch.float32, torch.bfloat16):
    for t, h, kvh, d in ((5, 14, 2, 64), (3, 3, 1, 10)):
        q, k, v = (torch.randn(t, x, d).to(dt) for x in (h, kvh, kvh))
        angles = 100 * torch.rand(t, d // 2)
        cos, sin = angles.cos(), angles.sin()
        kc, vc = torch.randn(2, 4, kvh, d).to(dt), torch.randn(2, 4, kvh, d).to(dt)
        slots = torch.tensor([7, -1, 0, 3, 5][:t])
        kc_ref, vc_ref = kc.clone(), vc.clone()
        q_rot, k_rot = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        C.rope_kv_cache_write(q, k, v, cos, sin, kc, vc, slots, q_rot, k_rot)
        want = ref(q, k, v, cos, sin, kc_ref, vc_ref, slots)
        same = [torch.equal(a, b) for a, b in ((q_rot, want[0]), (k_rot, want[1]), (kc, kc_ref), (vc, vc_ref))]
        if not all(same):
            failures.append(f"{dt} T{t} {h}/{kvh} d{d}: bitwise equal per output {same}")
print(json.dumps(failures))
'''


def test_cpu_scalar_path():
    """The scalar path (CPUs without AVX2/FMA), forced with BLIP3O_FAST_CPU_SCALAR=1: still bitwise."""
    assert run_scalar_child(_CHILD) == []
